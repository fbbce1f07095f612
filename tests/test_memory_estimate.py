"""The memory estimate made before the first step (vftrain/memory.py): its parts against parameter counts, its
monotonicity in every setting, and the decision a default run takes on a card of a given (faked) size: the lean
paths it turns on, or the one-line error naming what fits. The GPU check of the estimate against measured peaks is
benchmarks/memory21.sh."""

from __future__ import annotations

import dataclasses
import logging

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import vftrain as vf
from conftest import TINY, addition_rows, small_config
from vftrain import memory
from vftrain.errors import ConfigError
from vftrain.memory import GIB, Plan, estimate, total

# A Qwen2.5-0.5B-like shape, narrowed: the parts scale with these numbers, the test stays fast.
SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def model():
    config = AutoConfig.for_model("qwen2", **SHAPE)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def test_weights_gradients_and_optimizer_follow_parameter_counts(model):
    n = sum(p.numel() for p in model.parameters())
    parts = {mode: estimate(model, Plan(tokens=1024, master_weights=mode)) for mode in (True, "kahan", "kahan-bf16",
                                                                                        False)}
    assert parts[True]["weights"] == parts[True]["gradients"] == 2 * n
    # bytes per parameter of optimizer state kept: float32 copy + moments; compensation + float32 moments;
    # compensation + bf16 moments; bf16 moments (pure bf16 AdamW)
    assert [parts[m]["optimizer"] / n for m in (True, "kahan", "kahan-bf16", False)] == [12, 10, 6, 4]
    lora = estimate(model, Plan(tokens=1024, use_lora=True, lora_rank=8))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    assert lora["lora"] == 16 * sum(8 * (m.in_features + m.out_features) for m in linears)
    assert "gradients" not in lora and "optimizer" not in lora


def test_the_peak_is_the_forward_s_end_or_the_optimizer_step(model):
    """Without gradient accumulation the trainer frees a step's gradients before the next forward, so the forward's
    peak holds none (the 1.3B long-row runs: estimate 1.36-1.41x the measured peak while counting them, with liger
    also unseen); with it they live through the later forwards. A step with few tokens peaks at the optimizer step,
    where float32 master weights also make a float32 copy of every gradient."""
    n = sum(p.numel() for p in model.parameters())
    alone = estimate(model, Plan(tokens=4096, accumulates=False))
    accumulating = estimate(model, Plan(tokens=4096, accumulates=True))
    assert "gradients" not in alone and accumulating["gradients"] == 2 * n
    assert total(accumulating) - total(alone) == 2 * n
    few = estimate(model, Plan(tokens=1, accumulates=False))
    assert few == {"weights": 2 * n, "gradients": 2 * n, "optimizer": 12 * n, "step buffers": 4 * n}
    assert estimate(model, Plan(tokens=1, accumulates=False, master_weights=False))["step buffers"] == 0


def test_activations_per_token_per_layer(model):
    """hidden 128, 4 heads of 32 (2 KV heads), intermediate 512, 4 layers, bf16: the counts the docstring gives."""
    base = Plan(tokens=1000)
    per_layer = memory.layer_activation_elements(memory.Shape.of(model), base)
    assert per_layer == 2 * 4 * 128 + (2 * 4 + 2 * 2) * 32 + 4 * 512
    liger_varlen = memory.layer_activation_elements(memory.Shape.of(model), dataclasses.replace(
        base, liger=True, varlen=True))
    assert liger_varlen == 2 * 2 * 128 + 4 * 4 * 32 + 3 * 512
    assert estimate(model, base)["activations"] == 1000 * (4 * per_layer + 5 * 128) * 2


def test_estimate_grows_with_tokens_and_shrinks_with_each_lean_path(model):
    plan = Plan(tokens=8192, liger=True, varlen=True)
    sizes = [total(estimate(model, dataclasses.replace(plan, tokens=t))) for t in (1024, 4096, 8192, 16384)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    full = total(estimate(model, plan))
    lean = total(estimate(model, dataclasses.replace(plan, lean_mlp=True)))
    both = total(estimate(model, dataclasses.replace(plan, lean_mlp=True, gradient_checkpointing=True)))
    every2 = total(estimate(model, dataclasses.replace(plan, lean_mlp=True, gradient_checkpointing=True,
                                                       every_n_layers=2)))
    assert full > lean > both and both < every2 < lean
    modes = [total(estimate(model, dataclasses.replace(plan, master_weights=m))) for m in (True, "kahan",
                                                                                          "kahan-bf16", False)]
    assert modes == sorted(modes, reverse=True)


def _needs(model, plan) -> int:
    return total(estimate(model, plan))


def test_fit_keeps_lean_mlp_on_and_turns_on_checkpointing_where_needed(model, caplog):
    """A full-weight run gets lean_mlp by default (no slower on the GPU, less memory); checkpointing only where
    the estimate does not fit without it (logged); fields the user set are kept; a LoRA run gets lean_mlp only
    where it is needed."""
    plan = Plan(tokens=16384, liger=True, varlen=True)
    auto = ("lean_mlp", "gradient_checkpointing")
    lean = _needs(model, dataclasses.replace(plan, lean_mlp=True))
    assert lean < _needs(model, plan)
    with caplog.at_level(logging.INFO, logger="vftrain"):
        assert memory.fit(model, plan, int(lean / memory.FIT_SHARE) + 1, auto) == {
            "lean_mlp": True, "gradient_checkpointing": False}
    assert "set to true" not in caplog.text  # the default, not a memory decision
    both = _needs(model, dataclasses.replace(plan, lean_mlp=True, gradient_checkpointing=True))
    with caplog.at_level(logging.INFO, logger="vftrain"):
        assert memory.fit(model, plan, int(both / memory.FIT_SHARE) + 1, auto) == {
            "lean_mlp": True, "gradient_checkpointing": True}
    assert "memory: gradient_checkpointing set to true" in caplog.text
    assert "16,384 tokens per micro-batch" in caplog.text
    # lean_mlp set false by the user stays false: checkpointing alone is tried
    ckpt = _needs(model, dataclasses.replace(plan, gradient_checkpointing=True))
    assert memory.fit(model, plan, int(ckpt / memory.FIT_SHARE) + 1, ("gradient_checkpointing",)) == {
        "gradient_checkpointing": True}
    lora = dataclasses.replace(plan, use_lora=True, lora_rank=8)
    assert memory.fit(model, lora, int(_needs(model, lora) / memory.FIT_SHARE) + GIB, auto) == {
        "lean_mlp": False, "gradient_checkpointing": False}


def test_lean_mlp_stays_off_where_it_changes_nothing(model):
    """A model without SwiGLU MLPs (GELU here): the lean forward leaves them as they are, so the estimate does not
    count on it and fit neither sets it by default nor tries it before checkpointing."""
    from vftrain.mlp import has_swiglu

    gelu = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", hidden_act="gelu", **SHAPE),
                                            dtype=torch.bfloat16)
    assert has_swiglu(model) and not has_swiglu(gelu)
    plan = Plan(tokens=16384, liger=True, varlen=True, swiglu=False)
    assert _needs(gelu, dataclasses.replace(plan, lean_mlp=True)) == _needs(gelu, plan)
    auto = ("lean_mlp", "gradient_checkpointing")
    assert memory.fit(gelu, plan, int(_needs(gelu, plan) / memory.FIT_SHARE) + 1, auto) == {
        "lean_mlp": False, "gradient_checkpointing": False}
    ckpt = _needs(gelu, dataclasses.replace(plan, gradient_checkpointing=True))
    assert memory.fit(gelu, plan, int(ckpt / memory.FIT_SHARE) + 1, auto) == {
        "lean_mlp": False, "gradient_checkpointing": True}


def test_a_run_that_cannot_fit_names_the_tokens_that_do(model):
    plan = Plan(tokens=16384, liger=True, varlen=True)
    at_4k = _needs(model, dataclasses.replace(plan, tokens=4096, lean_mlp=True, gradient_checkpointing=True))
    with pytest.raises(ConfigError, match=r"needs about .* GiB at 16,384 tokens per micro-batch .*; set "
                                          r"micro_batch_tokens = (\d+)") as err:
        memory.fit(model, plan, int(at_4k / memory.FIT_SHARE) + 1, ("lean_mlp", "gradient_checkpointing"))
    fits = int(err.value.args[0].rsplit("micro_batch_tokens = ", 1)[1].split()[0])
    assert 4096 <= fits < 16384 and "\n" not in err.value.args[0]
    assert _needs(model, dataclasses.replace(plan, tokens=fits, lean_mlp=True, gradient_checkpointing=True)) <= \
        memory.FIT_SHARE * (int(at_4k / memory.FIT_SHARE) + 1)
    with pytest.raises(ConfigError, match="even one row does not fit: set use_lora = true"):
        memory.fit(model, plan, GIB // 1024, ("lean_mlp",))


def _trainer(tmp_path, **overrides):
    args = small_config(tmp_path, **overrides)
    return vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)), args=args)


def test_default_run_on_a_small_card_turns_on_the_lean_paths(tmp_path, monkeypatch):
    """The trainer asks the card (faked here: the CPU run's budget) before the first step; unset fields follow the
    estimate, fields the user set are kept."""
    monkeypatch.setattr(memory, "card_bytes", lambda device=None: 1)  # nothing fits: the lean paths are tried
    with pytest.raises(ConfigError, match="needs about"):
        _trainer(tmp_path / "a")
    monkeypatch.setattr(memory, "card_bytes", lambda device=None: 64 * GIB)
    roomy = _trainer(tmp_path / "b")
    assert roomy.args.lean_mlp is True and roomy.args.gradient_checkpointing is False  # lean_mlp: the default

    def small(device=None):  # fits only with both lean paths
        return small.budget

    plan_args = small_config(tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(TINY)
    plan = memory.plan_of(plan_args, model, roomy._largest_forward(roomy.args))
    small.budget = int(_needs(model, dataclasses.replace(plan, lean_mlp=True, gradient_checkpointing=True))
                       / memory.FIT_SHARE) + 1
    monkeypatch.setattr(memory, "card_bytes", small)
    tight = _trainer(tmp_path / "c")
    assert tight.args.lean_mlp is True and tight.args.gradient_checkpointing is True
    assert "every_n_layers" not in (tight.args.gradient_checkpointing_kwargs or {})  # both layers are needed
    kept = _trainer(tmp_path / "d", lean_mlp=False, gradient_checkpointing=True)
    assert kept.args.lean_mlp is False and kept.args.gradient_checkpointing is True
    tight.train()  # and the chosen settings train

    # Room for layer 1's activations: only layer 0 is checkpointed (layer 1 is not recomputed in the backward)
    small.budget = int(_needs(model, dataclasses.replace(plan, lean_mlp=True, gradient_checkpointing=True,
                                                         every_n_layers=2)) / memory.FIT_SHARE) + 1
    sparse = _trainer(tmp_path / "f")
    assert sparse.args.gradient_checkpointing is True
    assert sparse.args.gradient_checkpointing_kwargs == {"every_n_layers": 2}
    sparse.train()
    assert [layer.gradient_checkpointing for layer in sparse.model.model.layers] == [True, False]
    given = _trainer(tmp_path / "e", gradient_checkpointing_kwargs={"every_n_layers": 1})
    assert given.args.gradient_checkpointing_kwargs == {"every_n_layers": 1}  # the user's choice is kept


def test_cpu_run_needs_no_estimate(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.args.lean_mlp is False and trainer.args.gradient_checkpointing is False


def test_rl_estimate_counts_rollouts_at_their_longest_not_max_seq_len(tmp_path):
    """RL's token-budgeted micro-batches (micro_batch_size unset) are sized by the rollout's prompt + completion:
    the estimate must count the same tokens (max_seq_len x micro_batch_size counted up to 4x more at 256 + 256 and
    turned on gradient checkpointing a run did not need), and SFT's stays max_seq_len x micro_batch_size."""
    import vftrain as vf
    from vftrain import memory

    rl = vf.RLConfig(output_dir=str(tmp_path / "rl"), max_prompt_len=256, max_new_tokens=256, batch_size=128,
                     rollouts_per_example=8)
    assert rl.micro_batch_size * 512 <= memory.tokens_per_micro_batch(rl) <= 8192
    sft = vf.SFTConfig(output_dir=str(tmp_path / "sft"), max_seq_len=1024, micro_batch_size=4, batch_size=8)
    assert memory.tokens_per_micro_batch(sft) == 4096


def test_the_estimate_sees_liger_where_vftrain_applied_it(model):
    """vftrain patches liger-kernel into the model's instances (`models.apply_liger`), which keeps the modules'
    classes: the estimate read them by class name, counted a liger run's layers as transformers' (the 1.3B long-row
    run: 31 GiB of activations estimated, ~17 used) and could turn on checkpointing a run did not need."""
    from vftrain.models import apply_liger

    patched = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
    args = vf.SFTConfig(output_dir="unused", max_seq_len=1024, micro_batch_size=4, batch_size=8)
    assert memory.plan_of(args, patched).liger is False
    apply_liger(patched, device="cuda")  # patched as for a GPU run; nothing runs here
    plan = memory.plan_of(args, patched)
    assert plan.liger is True
    assert total(estimate(patched, plan)) < total(estimate(patched, dataclasses.replace(plan, liger=False)))


def _saved_bytes(model, layer, parameters, tokens: int) -> int:
    """Bytes autograd saves for the backward of decoder `layer` over `tokens` tokens, `parameters` and shared
    storages counted once (the layer's input included: its norm keeps it)."""
    hidden = model.model.embed_tokens(torch.randint(0, 1000, (1, tokens))).detach().requires_grad_()
    positions = torch.arange(tokens)[None]
    rotary = model.model.rotary_emb(hidden, positions)
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layer(hidden, position_embeddings=rotary, position_ids=positions, attention_mask=None)
    params = {p.untyped_storage().data_ptr() for p in parameters}
    return sum(n for ptr, n in saved.items() if ptr not in params)


def test_a_layers_activations_are_what_autograd_keeps(model):
    """The per-token count of transformers' own layer (SDPA, no liger) against the bytes autograd saves for the
    backward of one decoder layer over 512 tokens: within 5%."""
    kept = _saved_bytes(model, model.model.layers[0], model.parameters(), 512)
    counted = memory.layer_activation_elements(memory.Shape.of(model), Plan(tokens=512)) * 2 * 512
    assert counted == pytest.approx(kept, rel=0.05)


def test_a_bf16_lora_layer_keeps_what_the_estimate_counts(model):
    """bf16 LoRA adapters on a bf16 model (vftrain's default on bf16 weights) read each adapted layer's input as it
    is: the layer's saved bytes (the adapters' rank-8 outputs included) match the plain layer's count, with no
    per-adapter input copies (float32 adapters' casts make those, and the estimate counts them there); within 5%."""
    import copy

    from peft import LoraConfig, get_peft_model

    from vftrain.lora import adapters_in_base_dtype

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, target_modules="all-linear"))
    adapters_in_base_dtype(peft_model)
    tokens = 512
    kept = _saved_bytes(model, peft_model.base_model.model.model.layers[0], peft_model.parameters(), tokens)
    plan = Plan(tokens=tokens, use_lora=True, lora_rank=8, bf16_adapters=True)
    assert memory.layer_activation_elements(memory.Shape.of(model), plan) * 2 * tokens == pytest.approx(kept, rel=0.05)
    float32 = dataclasses.replace(plan, bf16_adapters=False)
    assert memory.layer_activation_elements(memory.Shape.of(model), float32) > \
        memory.layer_activation_elements(memory.Shape.of(model), plan)


def test_sft_estimates_the_largest_micro_batch_its_data_makes(tmp_path, monkeypatch):
    """SFT plans its micro-batches from the data before training (the sampler's plan is fixed by the seed): the
    estimate takes the largest of them (the addition rows: ~230 tokens per micro-batch) instead of the bound
    max_seq_len x micro_batch_size (8,192 here), which would turn on lean paths a card holding the real
    micro-batches does not need; and the run's forwards are no larger than that figure."""
    cfg = dict(max_seq_len=1024, max_steps=3)
    monkeypatch.setattr(memory, "card_bytes", lambda device=None: 64 * GIB)
    roomy = _trainer(tmp_path / "a", **cfg)
    planned = roomy._largest_forward(roomy.args)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    args = small_config(tmp_path / "plan", **cfg)
    budget = int(_needs(model, memory.plan_of(args, model, planned)) / memory.FIT_SHARE) + 1
    assert _needs(model, memory.plan_of(args, model)) > budget * memory.FIT_SHARE  # the bound would not fit
    monkeypatch.setattr(memory, "card_bytes", lambda device=None: budget)
    trainer = _trainer(tmp_path / "b", **cfg)
    assert trainer.args.lean_mlp is True and trainer.args.gradient_checkpointing is False
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
    trainer.train()
    assert len(seen) == 3 and max(seen) == planned


# Qwen2.5-7B's shape (issue 21's runs), on the meta device: nothing is allocated, the estimate reads shapes only.
SEVEN_B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
H100_80GB = int(79.2 * GIB)  # what an 80 GB H100 lets a process allocate


def test_the_issues_7b_runs_on_an_80gb_card():
    """At the defaults (liger, varlen, 'kahan-bf16') on an 80 GB card: the 7B LoRA fits at 4k tokens per
    micro-batch as it is, needs checkpointing at 16k and gets it before the first step, and a 7B full
    fine-tune stops with one line naming LoRA or FSDP (even one row with both lean paths does not fit)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **SEVEN_B), dtype=torch.bfloat16)
    auto = ("lean_mlp", "gradient_checkpointing")
    lora = Plan(tokens=4096, use_lora=True, lora_rank=8, liger=True, varlen=True, master_weights="kahan-bf16")
    assert memory.fit(model, lora, H100_80GB, auto) == {"lean_mlp": False, "gradient_checkpointing": False}
    at_16k = dataclasses.replace(lora, tokens=16384)
    # lean_mlp stays off: every MLP is LoRA-wrapped and keeps its stock forward, so it would save nothing
    assert memory.fit(model, at_16k, H100_80GB, auto) == {"lean_mlp": False, "gradient_checkpointing": True}
    # Without a user's every_n_layers: as few checkpointed layers as fit (each one left out is not recomputed)
    chosen = memory.fit(model, at_16k, H100_80GB, auto, sparse=True)
    n = chosen.pop("every_n_layers")
    assert chosen == {"lean_mlp": False, "gradient_checkpointing": True} and 1 < n < 28
    lean = dataclasses.replace(at_16k, gradient_checkpointing=True)
    assert _needs(model, dataclasses.replace(lean, every_n_layers=n)) <= H100_80GB * memory.FIT_SHARE
    assert _needs(model, dataclasses.replace(lean, every_n_layers=n + 1)) > H100_80GB * memory.FIT_SHARE
    full = dataclasses.replace(lora, use_lora=False)
    with pytest.raises(ConfigError, match=r"^the run needs about [\d.]+ GiB .*even one row does not fit: set use_lora "
                                          r"= true, or shard the model with fsdp = true$"):
        memory.fit(model, full, H100_80GB, auto)
