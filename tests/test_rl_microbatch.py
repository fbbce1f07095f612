"""RL's default micro-batch is token-budgeted (issue 20): as many rollouts per forward as fit micro_batch_tokens
(8,192 when unset) at their longest, and the update is the same as one rollout per forward, on one process or two,
with rollouts reused (num_iterations = 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

import vftrain as vf
from conftest import TINY, addition_rows, worker_env
from rl_worker import config, digits, one_sgd_step, per_prompt_sampling
from vftrain.errors import ConfigError
from vftrain.guards import close_process_group


@pytest.mark.parametrize("fields, micro, accumulation", [
    (dict(), 8, 32),  # 256 rollouts of up to 512 + 512 tokens: 8 x 1024 = 8k per forward
    (dict(batch_size=128, max_prompt_len=256, max_new_tokens=256), 16, 8),  # the RL benchmark's shape
    (dict(batch_size=128, max_prompt_len=1024, max_new_tokens=1024), 4, 32),
    (dict(batch_size=24, rollouts_per_example=4, micro_batch_tokens=5 * 1024), 4, 6),  # 5 fit; 4 divides 24
    (dict(micro_batch_tokens=4096), 4, 64),
    (dict(micro_batch_size=4), 4, 64),  # an explicit micro_batch_size is honoured
    (dict(packing=False), 8, 32),  # padded micro-batches stay sized in rows
])
def test_default_micro_batch_fits_the_token_budget(tmp_path, fields, micro, accumulation):
    cfg = vf.RLConfig(output_dir=str(tmp_path), **fields)
    assert (cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (micro, accumulation)
    assert "micro_batch_size" not in cfg.given_fields or "micro_batch_size" in fields  # config.toml keeps "unset"


def test_bad_batch_size_is_still_named(tmp_path):
    with pytest.raises(ConfigError, match="batch_size = 0 must be a positive integer"):
        vf.RLConfig(output_dir=str(tmp_path), batch_size=0)


def _delta(path: Path) -> dict:
    base = dict(vf.get_model_and_tokenizer(TINY)[0].named_parameters())
    return {n: w - base[n].detach() for n, w in torch.load(path).items()}


def _assert_same_update(a: dict, b: dict) -> None:
    assert max(float(d.abs().max()) for d in a.values()) > 1e-3  # the step moved the weights
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("budget, micro", [(None, 16), (64, 2)])
def test_default_budget_gives_the_update_of_one_rollout_per_forward(tmp_path, budget, micro):
    """The same 16 rollouts (of at most 24 + 6 tokens) give the same SGD update at the default budget (all 16 in
    one forward), at a 64-token budget (8 forwards of 2) and with micro_batch_size = 1 (16 forwards)."""
    one_sgd_step(str(tmp_path / "one"), micro_batch_size=1)
    trainer = one_sgd_step(str(tmp_path / "budget"), micro_batch_size=None, micro_batch_tokens=budget)
    assert (trainer.args.micro_batch_size, trainer.args.gradient_accumulation_steps) == (micro, 16 // micro)
    _assert_same_update(_delta(tmp_path / "one" / "weights.pt"), _delta(tmp_path / "budget" / "weights.pt"))


def test_default_budget_on_two_processes(tmp_path):
    """2 processes x 8 rollouts at a 64-token budget (4 forwards of 2 each) update as 1 process x 16 forwards of 1."""
    one_sgd_step(str(tmp_path / "one"), micro_batch_size=1)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29300 + os.getpid() % 1000), __file__, str(tmp_path / "two"),
                          json.dumps(dict(micro_batch_size=None, micro_batch_tokens=64))],
                         env=worker_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-6000:]  # the rank's message precedes torchrun's report
    assert json.loads((tmp_path / "two" / "split.json").read_text()) == [2, 4]
    _assert_same_update(_delta(tmp_path / "one" / "weights.pt"), _delta(tmp_path / "two" / "weights.pt"))


def _two_steps_on_one_batch(out_dir: Path, **overrides) -> dict:
    cfg = config(str(out_dir), 2, num_iterations=2, save_strategy="no", optim="sgd", learning_rate=0.1,
                 max_grad_norm=0.0, **overrides)
    trainer = per_prompt_sampling(vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(
        addition_rows(40)), args=cfg, reward_funcs=[digits]))
    trainer.train()
    base = dict(vf.get_model_and_tokenizer(TINY)[0].named_parameters())
    return {n: p.detach() - base[n].detach() for n, p in trainer.model.named_parameters()}


def test_default_budget_with_reused_rollouts(tmp_path):
    """num_iterations = 2: two updates on one step's rollouts, the same at the default budget as one per forward."""
    _assert_same_update(_two_steps_on_one_batch(tmp_path / "one", micro_batch_size=1),
                        _two_steps_on_one_batch(tmp_path / "budget", micro_batch_size=None))


if __name__ == "__main__":  # one process of test_default_budget_on_two_processes (torch.distributed.run)
    torch.set_num_threads(1)
    trainer = one_sgd_step(sys.argv[1], **json.loads(sys.argv[2]))
    if trainer.args.should_save:
        split = [trainer.args.micro_batch_size, trainer.args.gradient_accumulation_steps]
        (Path(sys.argv[1]) / "split.json").write_text(json.dumps(split))
    close_process_group()
