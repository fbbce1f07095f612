"""Compensated bf16 weights (`master_weights = "kahan"` / `"kahan-bf16"`, vftrain/optim.py CompensatedAdamW): the
updates of a fine-tuning learning rate are kept as float32 master weights keep them, the loss curve follows theirs,
a resume is exact, a skipped (non-finite) step leaves everything as it was, and bad values are one-line errors."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

import vftrain as vf
from conftest import TINY, addition_rows, small_config
from vftrain.errors import ConfigError
from test_optim import _train as train_adamw
from vftrain.optim import CompensatedAdamW, master_weights, use_float32_master_weights

MODES = ("kahan", "kahan-bf16")


def _train(tmp_path, dtype: str, master, **overrides):
    """AdamW at lr 2e-5 (a fine-tuning rate) for 12 steps; returns the trainer and the weights it started from."""
    return train_adamw(tmp_path, dtype, master, rows=64, **{"learning_rate": 2e-5, "max_steps": 12, **overrides})


def _held(trainer) -> dict[str, torch.Tensor]:
    """Each weight as the optimizer holds it: the bf16 parameter plus its compensation."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, CompensatedAdamW)
    return {n: p.detach().float() + optimizer.state[p]["compensation"].float()
            for n, p in trainer.model.named_parameters()}


def _update(start, weights) -> torch.Tensor:
    return torch.cat([(weights[n].detach().float() - w).flatten() for n, w in start.items()])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The float32 run's update, pure bf16's, and float32 master weights' losses."""
    tmp = tmp_path_factory.mktemp("reference")
    fp32, start = _train(tmp / "fp32", "float32", True)
    pure, _ = _train(tmp / "pure", "bfloat16", False)
    master, _ = _train(tmp / "master", "bfloat16", True)
    weights = lambda t: dict(t.model.named_parameters())  # noqa: E731
    return dict(update=_update(start, weights(fp32)), pure=_update(start, weights(pure)),
                master_losses=_losses(tmp / "master" / "out"), pure_losses=_losses(tmp / "pure" / "out"))


def _losses(folder) -> dict[int, float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.parametrize("mode", MODES)
def test_compensated_weights_keep_fine_tuning_updates(tmp_path, reference, mode):
    """12 steps at lr 2e-5: pure bf16 AdamW loses most of the float32 run's update; the compensated weights follow
    it to within a few percent, and the model's bf16 weights are those held weights rounded."""
    trainer, start = _train(tmp_path, "bfloat16", mode)
    size = reference["update"].abs().mean()
    assert (reference["pure"] - reference["update"]).abs().mean() > 0.5 * size
    held = _held(trainer)
    assert (_update(start, held) - reference["update"]).abs().mean() < 0.05 * size
    rounded = _update(start, dict(trainer.model.named_parameters()))
    assert (rounded - reference["update"]).abs().mean() < 0.5 * (reference["pure"] - reference["update"]).abs().mean()
    for n, p in trainer.model.named_parameters():  # the compensation is the rounding error: within half a unit
        spacing = torch.finfo(torch.bfloat16).eps * p.detach().float().abs()  # bf16's 2^-7 relative step
        assert p.dtype == torch.bfloat16 and ((held[n] - p.detach().float()).abs() <= spacing).all(), n


@pytest.mark.parametrize("mode", MODES)
def test_loss_curve_follows_float32_master_weights(tmp_path, reference, mode):
    """Same 12 steps: the loss curve is float32 master weights' within 2e-3 (bf16 forward noise), where pure bf16's
    drifts away from it by more."""
    _train(tmp_path, "bfloat16", mode)
    losses, master, pure = _losses(tmp_path / "out"), reference["master_losses"], reference["pure_losses"]
    assert sorted(losses) == sorted(master)
    assert [losses[s] for s in sorted(losses)] == pytest.approx([master[s] for s in sorted(master)], abs=2e-3)
    assert max(abs(pure[s] - master[s]) for s in master) > 2e-3


@pytest.mark.parametrize("mode", MODES)
def test_resume_with_compensated_weights_is_exact(tmp_path, mode):
    """A checkpoint at step 2 holds the compensation, the moments in their own dtype and the rounding's random
    state: the resumed steps 3-4 match the straight run's bit for bit."""
    save = dict(save_strategy="steps", save_steps=2, max_steps=4, learning_rate=1e-3)
    straight, _ = _train(tmp_path / "a", "bfloat16", mode, **save)
    resumed_args = small_config(tmp_path / "a", dtype="bfloat16", master_weights=mode, warmup_steps=0,
                                lr_scheduler_type="constant", micro_batch_size=4, output_dir=str(tmp_path / "b"),
                                **save)
    resumed = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(64)),
                            args=resumed_args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    a, b = _losses(tmp_path / "a" / "out"), _losses(tmp_path / "b")
    assert [b[s] for s in (3, 4)] == [a[s] for s in (3, 4)]
    held_a, held_b = _held(straight), _held(resumed)
    for n in held_a:
        assert torch.equal(held_a[n], held_b[n]), n
    moments = getattr(resumed.optimizer, "optimizer", resumed.optimizer).state
    expected = torch.float32 if mode == "kahan" else torch.bfloat16
    assert {s["exp_avg_sq"].dtype for s in moments.values()} == {expected}


@pytest.mark.parametrize("mode", MODES)
def test_skipped_step_changes_nothing(mode):
    """With found_inf set (the NaN guard's device-side skip) and NaN gradients, weights, compensation, moments
    and step counts stay as they were; the next finite step then updates."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(64, 8) * 0.02).bfloat16()), torch.nn.Parameter(torch.randn(8))]
    opt = CompensatedAdamW(params, lr=1e-3, moments=vf.optim.KAHAN_MODES[mode])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    for p, was, state in zip(params, *before):
        assert torch.equal(p.detach(), was)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    opt.found_inf = torch.zeros(())
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(not torch.equal(p.detach(), was) for p, was in zip(params, before[0]))
    assert all(opt.state[p]["step"].item() == 2 for p in params)


def test_float32_parameters_match_torch_adamw():
    """Without 16-bit weights there is nothing to compensate: the update is torch's AdamW, over segments that
    cut tensors apart (a small segment size) and a transposed, non-contiguous parameter."""
    torch.manual_seed(0)
    shapes = [torch.randn(300, 7), torch.randn(5), torch.randn(40, 30).t()]
    ours, theirs = [[torch.nn.Parameter(t.clone()) for t in shapes] for _ in range(2)]
    a = CompensatedAdamW(ours, lr=1e-3, weight_decay=0.1)
    b = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.1)
    segment, vf.optim._SEGMENT = vf.optim._SEGMENT, 500
    try:
        for _ in range(5):
            for p, q in zip(ours, theirs):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            a.step()
            b.step()
    finally:
        vf.optim._SEGMENT = segment
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_bad_master_weights_value_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"master_weights = 'kahn' is not allowed; choose one of .*'kahan-bf16'"):
        small_config(tmp_path, master_weights="kahn")
    args = small_config(tmp_path, dtype="bfloat16", master_weights="kahan", optim="sgd")
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)), args=args)
    with pytest.raises(ConfigError, match="master_weights = 'kahan' runs its own AdamW, but optim = 'sgd'"):
        trainer.train()


def test_unset_mode_is_kahan_bf16_where_the_optimizer_is_torchs_adamw(tmp_path):
    """Left unset, master_weights is the compensated bf16 AdamW with the default optim, and float32 masters where
    the compensated step cannot replace the optimizer; a bf16 run with another optimizer trains instead of
    stopping on the default."""
    assert small_config(tmp_path).master_weights == "kahan-bf16"
    assert small_config(tmp_path, optim="adamw_torch").master_weights == "kahan-bf16"
    args = small_config(tmp_path, dtype="bfloat16", optim="sgd", max_steps=1)
    assert args.master_weights is True
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)), args=args)
    trainer.train()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), torch.optim.SGD)


def test_command_line_reads_the_mode():
    from vftrain.cli.args import parse_argv

    assert parse_argv(["--sft.master_weights", "kahan-bf16"], "sft", {}).table == {"master_weights": "kahan-bf16"}


def _trained(optimizer_for, steps=3, lr=1e-3):
    """A bf16 parameter stepped `steps` times by `optimizer_for(params, lr)`; (parameter, optimizer)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(4096, generator=gen) * 0.02).to(torch.bfloat16))
    optimizer = optimizer_for([p], lr)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
        optimizer.step()
    return p, optimizer


def _float32_masters(params, lr):
    return use_float32_master_weights(torch.optim.AdamW(params, lr=lr))


def test_compensated_resume_of_a_float32_master_checkpoint_keeps_the_weights_and_updates():
    """A run begun with master_weights = true (the default before 'kahan-bf16') resumed as 'kahan-bf16': the
    checkpoint's float32 weights become p + c, and the next update is the float32 run's. Before, the bf16 weight had
    no compensation after the load and was stepped as pure bf16: an update of lr 1e-6 rounded away."""
    p, optimizer = _trained(_float32_masters)
    (_, master), = master_weights(optimizer)
    state = optimizer.state_dict()
    q = torch.nn.Parameter(p.detach().clone())  # the checkpoint's model weights (bf16)
    resumed = CompensatedAdamW([q], lr=1e-6, moments=torch.bfloat16)
    resumed.load_state_dict(state)
    compensation = resumed.state[q]["compensation"]
    assert ((q.float() + compensation.float() - master).abs() <= master.abs() * 2**-15 + 1e-12).all()
    assert resumed.state[q]["exp_avg"].dtype == torch.bfloat16
    for opt in (optimizer, resumed):  # the next step at a late-schedule learning rate, in both runs
        opt.param_groups[0]["lr"] = 1e-6
    p.grad = q.grad = torch.ones_like(q)
    optimizer.step()
    resumed.step()
    held = q.float() + resumed.state[q]["compensation"].float()
    # p + c holds ~16 bits (1e-7: weights near zero); pure bf16 (before) was off by up to half a bf16 step, ~1e-4
    assert ((held - master).abs() <= master.abs() * 2**-15 + 1e-7).all()


def test_float32_master_resume_of_a_compensated_checkpoint_starts_from_the_held_weights():
    """The other way: a 'kahan-bf16' checkpoint resumed with master_weights = true starts the float32 masters at
    p + c (not at p, which drops what c held), and no compensation is left in the optimizer's state."""
    p, optimizer = _trained(lambda params, lr: CompensatedAdamW(params, lr=lr, moments=torch.bfloat16))
    held = p.detach().float() + optimizer.state[p]["compensation"].float()
    state = optimizer.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    resumed = _float32_masters([q], 1e-3)
    resumed.load_state_dict(state)
    (_, master), = master_weights(resumed)
    assert torch.equal(master, held)
    assert all("compensation" not in s for s in resumed.state.values())
