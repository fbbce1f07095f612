"""The RL trainer: config checks, prompt schedule, advantages, what is trained, on-policy ratios, split
invariance, exact resume after SIGKILL, and the trainer's gradient against an independent computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import vftrain as vf
from conftest import TINY, addition_rows, tiny_tokenizer, worker_env
from rl_worker import config, digits, one_sgd_step
from vftrain.data.collate import IGNORE_INDEX, Collator
from vftrain.errors import ConfigError
from vftrain.rl import rollouts as R
from vftrain.sampling.tokens import Sample

HERE = Path(__file__).parent


def _metrics(out_dir) -> dict[int, dict]:
    records = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record  # a resumed run's later line for a step wins
    return records


@pytest.mark.parametrize("overrides, needle", [
    (dict(rollouts_per_example=1), "rollouts_per_example = 1"),
    (dict(batch_size=18, rollouts_per_example=4, micro_batch_size=2), "multiple of rollouts_per_example"),
    (dict(temperature=0.0), "temperature = 0.0 must be > 0"),
    (dict(max_prompt_len=30, max_new_tokens=8, max_seq_len=32), "exceeds max_seq_len"),
    (dict(mask_ratio_low=2.0), "mask_ratio_low"),
    (dict(scale_rewards="std"), "scale_rewards = 'std' is not allowed"),
    (dict(reward_funcs=["exact_match", "m:f"], reward_weights=[1.0]), "one weight per reward_funcs entry"),
    (dict(env="gsm8k", reward_funcs=["m:f"]), "leave reward_funcs unset"),
    (dict(env_args={"n": 1}), "env_args is set without env"),
])
def test_config_errors_name_the_field(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        config(str(tmp_path), 1, **overrides)


def test_rl_defaults_suit_rl(tmp_path):
    cfg = vf.RLConfig(output_dir=str(tmp_path))
    assert cfg.learning_rate == pytest.approx(vf.SFTConfig(output_dir=str(tmp_path)).learning_rate / 10)
    assert (cfg.temperature, cfg.logging_steps, cfg.beta) == (1.0, 1, 0.0)
    assert cfg.run_name.startswith("rl-")


def test_prompt_columns_and_references():
    messages = [{"role": "user", "content": "2+2"}]
    assert R.prompt_and_answer({"prompt": messages, "answer": "4"})[:2] == (messages, "4")
    assert R.prompt_and_answer({"question": "2+2", "answer": 4})[:2] == (messages, "4")
    sft_row = {"prompt": messages, "completion": [{"role": "assistant", "content": "4"}]}
    assert R.prompt_and_answer(sft_row)[:2] == (messages, "4")  # an SFT dataset serves RL as is
    assert R.prompt_and_answer({"prompt": messages})[1] is None  # needed only by functions that read one


def test_step_prompts_are_a_function_of_the_round():
    first = [R.step_prompts(10, 4, seed=0, round_=s) for s in range(4)]
    assert [R.step_prompts(10, 4, seed=0, round_=s).tolist() for s in range(4)] == [f.tolist() for f in first]
    assert len(set(first[0]) | set(first[1])) == 8  # one epoch (2 steps of 4) takes distinct prompts
    assert sorted(first[2].tolist() + first[3].tolist()) != sorted(first[0].tolist() + first[1].tolist()) or \
        first[2].tolist() != first[0].tolist()  # the next epoch reshuffles


def test_group_advantages():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    assert R.group_advantages(rewards, 4).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    scaled = R.group_advantages(rewards, 4, "group")
    assert scaled[:4] == pytest.approx([1, -1, -1, 1], rel=1e-3) and (scaled[4:] == 0).all()
    metrics = R.rollout_metrics(rewards, {"r": rewards}, R.group_advantages(rewards, 4),
                                [Sample([1], [2, 3], [0.0, 0.0], "stop")] * 8, 4)
    assert metrics["frac_reward_zero_std"] == 0.5 and metrics["reward"] == pytest.approx(1.25)


def test_completion_length_counts_the_tokens_the_model_sampled():
    """A multi-turn rollout's completion holds the environment's tool results between the model's turns (mask 0):
    completion_len and rollouts.jsonl count only what the model generated."""
    rewards = np.array([1.0, 0.0])
    samples = [Sample([1], [2, 3, 4, 5, 6, 7], [0.0] * 6, "stop", mask=[1, 1, 0, 0, 0, 1]),
               Sample([1], [2, 3, 4], [0.0] * 3, "stop")]
    advantages = R.group_advantages(rewards, 2)
    metrics = R.rollout_metrics(rewards, {"r": rewards}, advantages, samples, 2)
    assert metrics["completion_len"] == 3 and metrics["completion_len_max"] == 3
    records = [json.loads(line) for line in R.rollout_records(0, ["p", "p"], ["a", "b"], samples, rewards,
                                                                {"r": rewards}, advantages)]
    assert [r["completion_tokens"] for r in records] == [3, 3]
    assert [r.get("environment_tokens", 0) for r in records] == [3, 0]


def test_only_completion_tokens_are_trained_stop_token_included():
    """Prompt and padding never reach the loss; every completion token, the stop token too, does, with the
    sampler's logprob and the advantage at the position that predicts it."""
    tok = tiny_tokenizer()
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    samples = [Sample([5, 6, 7], [20, 21, stop], [-0.1, -0.2, -0.3], "stop"),
               Sample([5, 8], [30, 31, 32, 33], [-1.0, -1.1, -1.2, -1.3], "length")]
    rows = R.training_rows(samples, np.array([0.5, -2.0]))
    for collator in (Collator(tok.pad_token_id, True), Collator(tok.pad_token_id, True, 8),
                     Collator(tok.pad_token_id, False)):
        batch = collator(rows)
        targets, logps, advs = [], [], []
        for part in batch.get("micro_batches", [batch]):
            keep = part["labels"] != IGNORE_INDEX
            targets += part["labels"][keep].tolist()
            logps += part["token_values"][keep][:, 0].tolist()
            advs += part["token_values"][keep][:, 1].tolist()
        assert sorted(targets) == sorted([20, 21, stop, 30, 31, 32, 33])
        order = np.argsort(targets)
        expected = dict(zip([20, 21, stop, 30, 31, 32, 33], [-0.1, -0.2, -0.3, -1.0, -1.1, -1.2, -1.3]))
        assert [logps[i] for i in order] == pytest.approx([expected[t] for t in sorted(targets)])
        assert sorted(advs) == pytest.approx(sorted([0.5] * 3 + [-2.0] * 4))


def _trainer(tmp_path, **overrides):
    cfg = config(str(tmp_path / "out"), overrides.pop("max_steps", 1), save_strategy="no", **overrides)
    return vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=cfg,
                        reward_funcs=[digits])


def test_on_policy_ratio_is_one_with_the_embedded_sampler(tmp_path):
    """float32, embedded sampler: the trainer's logprobs of the sampled tokens equal the sampler's own."""
    trainer = _trainer(tmp_path, temperature=0.7, micro_batch_size=2)
    trainer.train()
    record = _metrics(tmp_path / "out")[1]
    assert abs(record["importance_ratio_min"] - 1) < 1e-5 and abs(record["importance_ratio_max"] - 1) < 1e-5
    assert record["mismatch_kl"] < 1e-9 and record["masked_frac"] == 0 and record["clipped_frac"] == 0
    assert record["grad_norm"] > 0


def test_on_policy_ratio_is_one_when_training_with_varlen_attention(tmp_path):
    """A model that trains with "varlen" (the default on a CUDA GPU) samples its rollouts with masked attention:
    the packed-only kernel cannot decode padded prompts over a KV cache."""
    trainer = _trainer(tmp_path, attn_implementation="varlen", micro_batch_size=4)
    trainer.train()
    record = _metrics(tmp_path / "out")[1]
    assert abs(record["importance_ratio_min"] - 1) < 1e-5 and abs(record["importance_ratio_max"] - 1) < 1e-5


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_static_cache_decoding_samples_what_the_dynamic_cache_does(device):
    """Rollouts over a static KV cache (on CUDA: replayed as a CUDA graph) are those of transformers' dynamic cache:
    same seed, same tokens, logprobs and finish reasons, with left-padded prompts of different lengths, stop tokens
    reached at different steps, and more rows than one batch."""
    from transformers import AutoModelForCausalLM

    from vftrain.sampling.tokens import sample

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).to(device)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    runs = {graphs: sample(model, prompts, n=3, max_new_tokens=12, temperature=0.8, top_p=0.95,
                           stop_ids=set(range(20, 32)), pad_id=96, seed=1, batch_size=4, graphs=graphs)
            for graphs in (True, False)}
    static, dynamic = [[s for group in runs[g] for s in group] for g in (True, False)]
    assert [s.completion_ids for s in static] == [s.completion_ids for s in dynamic]
    assert [s.finish_reason for s in static] == [s.finish_reason for s in dynamic]
    assert {s.finish_reason for s in static} == {"stop", "length"}  # both endings are exercised
    for a, b in zip(static, dynamic):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.parametrize("split", [dict(micro_batch_size=2), dict(micro_batch_size=8, micro_batch_tokens=32),
                                   dict(micro_batch_size=4, packing=False), "2 processes"])
def test_update_is_the_same_for_any_split(tmp_path, split):
    """The same rollouts give the same update (SGD, learning rate 1: the weight change is the gradient) for one
    micro-batch of 16 rollouts, 8 micro-batches of 2, token-capped forwards, padded micro-batches, or 2 processes x
    4 micro-batches."""
    one_sgd_step(str(tmp_path / "a"), micro_batch_size=16)
    if split == "2 processes":
        run = _run(tmp_path / "b", 0, processes=2)
        assert run.returncode == 0, run.stderr[-2000:]
    else:
        one_sgd_step(str(tmp_path / "b"), **split)
    base = dict(vf.get_model_and_tokenizer(TINY)[0].named_parameters())
    a, b = torch.load(tmp_path / "a" / "weights.pt"), torch.load(tmp_path / "b" / "weights.pt")
    assert max(float((a[n] - base[n]).abs().max()) for n in a) > 1e-3  # the step moved the weights
    for name in a:
        torch.testing.assert_close(a[name] - base[name], b[name] - base[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_gradient_equals_reinforce_on_the_same_tokens(tmp_path):
    """One step's gradient (on-policy: ratio 1, nothing clipped) equals an independent REINFORCE computation
    -(1/N) sum A grad log p over the step's completion tokens, from the trainer's own rollouts."""
    trainer = _trainer(tmp_path, micro_batch_size=4)
    batches, count = trainer.get_batch_samples(iter(range(100)), trainer.args.gradient_accumulation_steps, "cpu")
    model = trainer.model
    model.zero_grad()
    for batch in batches:
        trainer.compute_loss(model, dict(batch), num_items_in_batch=count).backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    total = 0.0
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        logits = model(input_ids=ids, position_ids=batch["position_ids"]).logits[0] / trainer.args.temperature
        keep = labels[0] != IGNORE_INDEX
        logp = logits.log_softmax(-1)[keep].gather(1, labels[0][keep][:, None])[:, 0]
        total = total - (batch["token_values"][0][keep, 1] * logp).sum()
    (total / count).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert expected.abs().max() > 0
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_kl_reference_is_the_starting_model_token_by_token(tmp_path, lora):
    """beta > 0: the reference logprobs the loss uses, batched per micro-batch, are the starting model's logprobs
    of each trained token (computed here row by row); KL is 0 at the first step and grows once the policy moves.
    Under LoRA the reference is the base model (adapters off)."""
    trainer = _trainer(tmp_path, beta=0.5, micro_batch_size=4, max_steps=3, learning_rate=3e-2, use_lora=lora,
                       lora_rank=4)
    trainer.train()
    kls = [_metrics(tmp_path / "out")[step]["kl"] for step in (1, 2, 3)]
    assert kls[0] < 1e-7 and kls[2] > 1e-4, kls
    start = vf.get_model_and_tokenizer(TINY)[0]
    batches, _ = trainer.get_batch_samples(iter(range(100)), trainer.args.gradient_accumulation_steps, "cpu")
    for batch in batches:
        labels = batch["labels"]
        where = (batch["trained_positions"], batch["trained_flat"])
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "token_values", *WHERE)}
        got = trainer._reference_logp(trainer.model, inputs, labels, where)
        expected, policy = [], []
        for s, e in zip(batch["cu_seq_lens_q"][:-1].tolist(), batch["cu_seq_lens_q"][1:].tolist()):
            row, keep = batch["input_ids"][:, s:e], labels[0, s:e] != IGNORE_INDEX
            for model, out in ((start, expected), (trainer.model, policy)):
                logits = model(input_ids=row).logits[0].detach() / trainer.args.temperature
                out.append(logits.log_softmax(-1)[keep].gather(1, labels[0, s:e][keep][:, None])[:, 0])
        torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-5)
        assert (got - torch.cat(policy)).abs().max() > 1e-3  # the policy has moved away from it


WHERE = ("trained_positions", "trained_flat")


def test_nan_loss_stops_rl_with_the_rl_command_line(tmp_path, monkeypatch):
    """A NaN loss stops an RL run before the weights change, and the message names vf-rl's flag, not vf-sft's."""
    import vftrain.rl.trainer as rl_trainer
    from vftrain.guards import NonFiniteLossError

    real = rl_trainer.token_loss_sum

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(rl_trainer, "token_loss_sum", poisoned)
    trainer = _trainer(tmp_path)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match=r"--rl\.resume_from_checkpoint latest"):
        trainer.train()
    assert all(torch.equal(p.detach(), start[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize("use_lora", [False, True])
def test_openai_backend_samples_from_the_weights_being_trained(tmp_path, use_lora):
    """rl_backend = "openai" against `vftrain.serve`: every step pushes the weights before sampling, so the server's
    logprobs are the trainer's at every step (ratio 1 within float32 noise). A stale server (no push after step 1's
    large update) would put step 2's ratios far from 1; the test checks that the weights did move."""
    from vftrain.serve import serve

    server = serve(TINY, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        trainer = _trainer(tmp_path, rl_backend="openai", sample_base_url=url, max_steps=3, learning_rate=3e-2,
                           micro_batch_size=4, use_lora=use_lora, lora_rank=4)
        start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
    finally:
        server.shutdown()
        server.server_close()
    moved = max(float((p.detach() - start[n]).abs().max()) for n, p in trainer.model.named_parameters()
                if p.requires_grad)
    assert moved > 1e-2
    records = _metrics(tmp_path / "out")
    for step in (1, 2, 3):
        assert abs(records[step]["importance_ratio_min"] - 1) < 1e-4, (step, records[step])
        assert abs(records[step]["importance_ratio_max"] - 1) < 1e-4, (step, records[step])
        assert records[step]["time/sync"] > 0


def _run(out_dir, max_steps, kill_at=0, resume=False, processes=1, num_iterations=1, save_steps=2):
    env = worker_env()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(29700 + os.getpid() % 1000)] if processes > 1 else [sys.executable]
    return subprocess.run([*launcher, str(HERE / "rl_worker.py"), str(out_dir), str(max_steps), str(kill_at),
                           "1" if resume else "0", str(num_iterations), str(save_steps)], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("num_iterations, save_steps", [(1, 2), (2, 3)])
def test_sigkill_and_resume_reproduce_losses_and_rewards(tmp_path, num_iterations, save_steps):
    """Rollouts after a resume are those the uninterrupted run sampled (sampling RNG keyed by step): same rewards,
    same losses. With num_iterations = 2 the checkpoint after step 3 carries the rollouts step 4 reuses."""
    run = dict(num_iterations=num_iterations, save_steps=save_steps)
    full = _run(tmp_path / "full", 6, **run)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run(tmp_path / "killed", 6, kill_at=5, **run)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _run(tmp_path / "killed", 6, resume=True, **run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _metrics(tmp_path / "full"), _metrics(tmp_path / "killed")
    assert sorted(got) == list(range(1, 7))
    assert len({r["reward"] for r in expected.values() if "reward" in r}) > 1  # rewards vary: the check can fail
    last_checkpoint = 5 // save_steps * save_steps
    for step in range(last_checkpoint + 1, 7):
        for key in {"reward", "loss", "completion_len"} & set(expected[step]):  # reused rollouts log no reward
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_rollouts_file_keeps_every_rollout(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "out" / "rollouts.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 16 and {x["step"] for x in lines} == {1, 2}
    assert set(lines[0]) >= {"prompt", "completion", "reward", "rewards", "advantage", "finish_reason"}
    for step in (1, 2):
        group = [x for x in lines if x["step"] == step][:4]
        assert sum(x["advantage"] for x in group) == pytest.approx(0, abs=1e-9)


def test_question_rows_with_a_system_prompt_and_string_prompts_said(caplog):
    """A `system_prompt` column beside `question` was dropped without a word; string `prompt`s are sampled as
    plain text, as TRL does, which a chat model answers badly (0% from a 100% SFT model): now said at start."""
    from vftrain.data.render import render_prompt
    from vftrain.rl.rollouts import PromptSet

    tokenizer = tiny_tokenizer()
    rows = [{"question": "1+2", "system_prompt": "Add.", "answer": "3"}, {"question": "2+2", "answer": "4"}]
    prompts = PromptSet.build(datasets.Dataset.from_list(rows), tokenizer, 64)
    assert prompts.ids == [render_prompt(tokenizer, [{"role": "system", "content": "Add."},
                                                     {"role": "user", "content": "1+2"}]),
                           render_prompt(tokenizer, [{"role": "user", "content": "2+2"}])]
    with caplog.at_level("WARNING", logger="vftrain"):
        PromptSet.build(datasets.Dataset.from_list([{"prompt": "1+2", "answer": "3"}]), tokenizer, 64)
    assert "1 prompts are strings: sampled as plain text, without the chat template (as TRL does)" in caplog.text


@pytest.mark.parametrize("extra, prompts", [(["--rl.eval_size", "8"], 32),
                                            (["--rl.sample_every_n_steps", "5", "--rl.num_samples", "4"], 36)])
def test_vf_rl_inspect_shows_the_prompts_rl_trains_on(tmp_path, capsys, extra, prompts):
    """--inspect read the whole split: with held-out rows cut from it (eval_size, or the sample panels' rows) it
    counted and showed prompts RL never trains on."""
    from conftest import write_jsonl
    from vftrain.cli.rl import main as rl_main

    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(40))
    assert rl_main(["--model", TINY, "--dataset", data, "--rl.output_dir", str(tmp_path / "out"), *extra,
                    "--inspect", "1"]) == 0
    assert f"{prompts} prompts; longest" in capsys.readouterr().out
