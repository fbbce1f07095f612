"""Data parallel through torchrun/accelerate (DDP, gloo on CPU): the same global batch on 2 processes gives the
same loss curve and gradient norms as on 1, with packing making the ranks' trained-token counts differ (so a
per-rank mean would weigh tokens wrongly, prime-rl#1961); console output and files come from rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, addition_rows, worker_env, write_jsonl

ARGS = ["--model", TINY, "--sft.max_steps", "6", "--sft.logging_steps", "1", "--sft.batch_size",
        "32", "--sft.micro_batch_size", "4", "--sft.packing", "true", "--sft.save_strategy", "no",
        "--sft.disable_tqdm", "true", "--sft.learning_rate", "1e-2", "--sft.max_seq_len", "128"]


def _dataset(tmp_path) -> str:
    """Two kinds of rows of similar length: long prompts with 3-token answers, and short prompts with a 60-token
    easy pattern. Packing balances total tokens, so ranks get similar lengths but different trained-token counts
    and per-token losses: a per-rank mean moves the loss by ~5e-4 (relative) within 6 steps."""
    rows = addition_rows(128)
    for row in rows:
        row["prompt"][0]["content"] += " pad" * 15
    easy = {"prompt": [{"role": "user", "content": "ab"}], "completion": [{"role": "assistant", "content": "xy" * 30}]}
    return write_jsonl(tmp_path / "data.jsonl", [r for pair in zip(rows, [easy] * 128) for r in pair])


def _run(out_dir, processes: int, data: str, extra=(), fsdp=False, accelerate=False, timeout=600, program=None):
    env = worker_env()  # CPU processes over gloo, also where a GPU is
    port = str(29500 + os.getpid() % 1000)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", port] if processes > 1 else [sys.executable]
    if accelerate:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                    port]
    program = program or ([str(ROOT / "tests" / "cpu_fsdp.py")] if fsdp else ["-m", "vftrain.cli.sft"])
    return subprocess.run([*launcher, *program, *ARGS, *extra, "--dataset", data, "--sft.output_dir", str(out_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _train(out_dir, processes: int, data: str, extra=(), fsdp=False, accelerate=False, timeout=600):
    proc = _run(out_dir, processes, data, extra, fsdp, accelerate, timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]  # the rank's own message comes before torchrun's report
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], proc.stdout


def _assert_same_curve(one, two, rel=5e-5):
    assert [r["step"] for r in two] == [r["step"] for r in one]  # rank 0 alone writes metrics.jsonl
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=rel), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=rel)
        assert b["trained_tokens"] == a["trained_tokens"]  # counted over both ranks


# Sampling settings of the shared 1-process reference run, which every 2-process run below repeats (the sampled
# rows are held out of training) and is compared against: 2-process runs are what the CI's time goes to.
SAMPLING = ("--sft.sample_every_n_steps", "3", "--sft.num_samples", "2", "--sft.max_new_tokens", "6")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(data file, 1-process curve, its stdout): one run that every 2-process test of this file matches."""
    folder = tmp_path_factory.mktemp("reference")
    data = _dataset(folder)
    curve, stdout = _train(folder / "one", 1, data, SAMPLING)
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5, 6]
    return data, curve, stdout


@pytest.mark.parametrize("extra, accelerate", [(("--sft.micro_batch_tokens", "160"), False), ((), True)],
                         ids=["torchrun-token-budget", "accelerate-launch"])
def test_two_processes_match_one(tmp_path, reference, extra, accelerate):
    """With a token budget, ranks run different numbers of forwards per step (gradient sync after the last);
    `accelerate launch` and torchrun start the same run."""
    data, one, _ = reference
    two, stdout = _train(tmp_path / "two", 2, data, (*extra, *SAMPLING), accelerate=accelerate)
    _assert_same_curve(one, two)
    assert stdout.count("step 1/6 |") == 1
    assert stdout.count("train data: 254 rows kept") == 1  # info lines from rank 0 only


def test_fsdp2_matches_one_process_saves_and_resumes(tmp_path, reference):
    """FSDP2 (2 CPU processes, tests/cpu_fsdp.py), with a token budget splitting some micro-batches and activation
    checkpointing of every 2nd layer (`gradient_checkpointing_kwargs = {every_n_layers = 2}`) inside FSDP2's layer
    groups: the 1-process curve, the fused head on sharded weights, the same samples; its checkpoint is a plain
    transformers folder, and a resume from step 3 repeats steps 4-6."""
    from transformers import AutoModelForCausalLM

    data, one, one_out = reference
    # accelerate's gathered resume files, which a user's explicit state_dict_type still selects (vftrain's default,
    # sharded, is tested below)
    save = ("--sft.save_strategy", "steps", "--sft.save_steps", "3", "--sft.micro_batch_tokens", "160",
            "--sft.fsdp_config", json.dumps({"state_dict_type": "FULL_STATE_DICT"}), *_checkpointing(2))
    two, stdout = _train(tmp_path / "fsdp", 2, data, ("--sft.fsdp", "true", *save, *SAMPLING), fsdp=True)
    _assert_same_curve(one, two)
    # Samples from sharded weights: both processes generate in lockstep, rank 0 alone shows them.
    assert stdout.count("sample, step 3") == 2 and stdout.count("sample, step 6") == 2  # 2 prompts, once each
    assert _completions(stdout) == _completions(one_out)
    resolved = json.loads((tmp_path / "fsdp" / "checkpoint-3" / "vftrain_config.json").read_text())
    assert resolved["config"]["fsdp"] is True
    assert (tmp_path / "fsdp" / "checkpoint-3" / "pytorch_model_fsdp.bin").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "checkpoint-6")  # full weights, not shards
    assert sum(p.numel() for p in model.parameters()) > 100_000

    resumed, _ = _train(tmp_path / "fsdp", 2, data, ("--sft.fsdp", "true", *save, *SAMPLING,
                                                    "--sft.resume_from_checkpoint",
                                                    str(tmp_path / "fsdp" / "checkpoint-3")), fsdp=True)
    assert [r["step"] for r in resumed[-3:]] == [4, 5, 6]
    for a, b in zip(two[3:], resumed[-3:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_fsdp2_runs_every_forward_when_a_budget_splits_the_ranks_unevenly(tmp_path):
    """A token budget splits each rank's micro-batch into its own number of forwards; under FSDP2 every rank must
    take part in every forward, so the rank with fewer repeats one weighed 0. Before, the run hung on the first
    uneven step. The curve and the token counts are the 1-process run's."""
    import datasets
    import numpy as np

    import vftrain as vf
    from vftrain.data import tokenize_dataset
    from vftrain.data.load import data_seed
    from vftrain.data.pack import plan_epoch, split_by_tokens

    rows = addition_rows(128)
    for i, row in enumerate(rows):  # prompts of four lengths: the ranks' micro-batches split differently
        row["prompt"][0]["content"] += " pad" * (0, 5, 20, 45)[i * 7 % 4]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    budget = ("--sft.max_seq_len", "256", "--sft.micro_batch_tokens", "300")
    config = vf.SFTConfig(output_dir=str(tmp_path / "plan"), batch_size=32, micro_batch_size=4, max_seq_len=256)
    lengths = tokenize_dataset(datasets.load_dataset("json", data_files=data, split="train"),
                               vf.get_model_and_tokenizer(TINY)[1], 256, "drop", None, "train", False)[0].lengths
    plan = plan_epoch(lengths, 32, 8, True, data_seed(config), 0)
    forwards = np.array([len(split_by_tokens([int(lengths[r]) for r in rows], 300)) for rows in plan[:32]])
    # The premise: a step whose last micro-batch (where gradients are reduced) splits differently on the two ranks
    assert (forwards.reshape(4, 8)[:, 6] != forwards.reshape(4, 8)[:, 7]).any()

    one, _ = _train(tmp_path / "one", 1, data, budget)
    two, _ = _train(tmp_path / "fsdp", 2, data, ("--sft.fsdp", "true", *budget), fsdp=True, timeout=300)
    _assert_same_curve(one, two)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]  # the repeated forwards count nothing


def _checkpointing(every: int) -> tuple[str, ...]:
    return ("--sft.gradient_checkpointing", "true", "--sft.gradient_checkpointing_kwargs",
            json.dumps({"every_n_layers": every}))


def test_fsdp2_sharded_checkpoint_resumes_exactly_and_loads(tmp_path):
    """vftrain's FSDP default: each process writes its own shards of the resume state (float32 weights, Adam moments;
    torch.distributed.checkpoint), nothing gathered through one process, while the checkpoint folder still holds the
    gathered model in its own dtype for from_pretrained. A resume from step 4 repeats steps 5-6 exactly: the float32
    shards, optimizer moments and schedule come back (a restarted optimizer, or weights reloaded from the bf16 model
    file, would change the losses). Checkpoints stay atomic and save_total_limit holds."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    data = _dataset(tmp_path)
    run = ("--sft.fsdp", "true", "--sft.dtype", "bfloat16", "--sft.bf16", "true", "--sft.save_strategy", "steps",
           "--sft.save_steps", "2", "--sft.save_total_limit", "2")
    straight, _ = _train(tmp_path / "out", 2, data, run, fsdp=True)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".staging"))) == \
        ["checkpoint-4", "checkpoint-6"]
    ckpt = out / "checkpoint-4"
    assert (ckpt / "pytorch_model_fsdp_0" / ".metadata").is_file() and (ckpt / "optimizer_0" / ".metadata").is_file()
    assert len(list((ckpt / "optimizer_0").glob("*.distcp"))) == 2  # one file per process, written in parallel
    assert not (ckpt / "pytorch_model_fsdp.bin").exists() and not (ckpt / "optimizer.bin").exists()
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f, \
            safe_open(str(Path(TINY) / "model.safetensors"), "pt") as base:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
        assert set(f.keys()) == set(base.keys())  # the model's own names, the tied head once
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
    assert model.dtype == torch.bfloat16 and all(torch.isfinite(p).all() for p in model.parameters())
    # bf16 mixed precision trains float32 copies; the checkpoint and the final model are still bf16 and their
    # config says so: loaders that follow it (dtype="auto", vLLM) would otherwise upcast a 7B model to 30 GB.
    for folder in (ckpt, out):
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}

    resumed, _ = _train(out, 2, data, (*run, "--sft.resume_from_checkpoint", str(ckpt)), fsdp=True)
    assert [r["step"] for r in resumed[-2:]] == [5, 6]
    for a, b in zip(straight[4:], resumed[-2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)

LOAD_WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
import cpu_fsdp  # noqa: F401  (FSDP2 on CPU processes)
import datasets
import vftrain as vf
from vftrain.guards import close_process_group
from conftest import TINY, addition_rows
fsdp = {fsdp!r}
cfg = vf.SFTConfig(output_dir={out!r}, max_steps=3, batch_size=8, micro_batch_size=4, max_seq_len=64, seed=0,
                   learning_rate=1e-2, warmup_steps=0, logging_steps=1, save_strategy="no", disable_tqdm=True,
                   dataloader_pin_memory=False, **fsdp)
trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(16)), args=cfg)
empty = all(p.is_meta for p in trainer.model.parameters())
trainer.train()
print("RANK", cfg.process_index, json.dumps(empty), flush=True)
close_process_group()
"""


def _load_run(tmp_path, name, processes, fsdp):
    script = tmp_path / f"{name}.py"
    script.write_text(LOAD_WORKER.format(tests=str(ROOT / "tests"), out=str(tmp_path / name), fsdp=fsdp))
    env = worker_env()  # CPU processes over gloo, also where a GPU is
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(29500 + os.getpid() % 1000)] if processes > 1 else [sys.executable]
    proc = subprocess.run([*launcher, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    empty = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RANK "))
    losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return {int(k): json.loads(v) for k, v in empty.items()}, losses


def test_fsdp2_reads_the_weights_on_rank_0_only(tmp_path):
    """Under FSDP the other ranks build the model empty (no CPU copy per GPU) and receive their shards from rank 0;
    `cpu_ram_efficient_loading = false` loads on every rank. Both train the same losses, so the shards rank 0 sent
    are the weights every rank would have read (the other tests match FSDP runs to one process)."""
    empty, losses = _load_run(tmp_path, "fsdp", 2, {"fsdp": True})
    assert empty == {0: False, 1: True}
    empty, every_rank = _load_run(tmp_path, "every_rank", 2, {"fsdp": True,
                                                             "fsdp_config": {"cpu_ram_efficient_loading": False}})
    assert empty == {0: False, 1: False}
    assert len(losses) == 3 and losses == pytest.approx(every_rank, rel=1e-6)


def test_fsdp2_lora_merges_like_one_process(tmp_path):
    """LoRA adapters sharded by FSDP2 are gathered and merged into a plain model folder equal to the 1-process one;
    also when the run was killed after its last checkpoint, before its final save: the requeued job stopped with
    "train() cannot load them without training" (sharded weights); it now loads the checkpoint's shards, saves and
    merges."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    data = _dataset(tmp_path)
    lora = ("--sft.use_lora", "true", "--sft.merge_lora", "true", "--sft.max_steps", "3")
    _train(tmp_path / "one", 1, data, lora)
    saved = ("--sft.fsdp", "true", *lora, "--sft.save_strategy", "steps", "--sft.save_steps", "3")
    _train(tmp_path / "fsdp", 2, data, saved, fsdp=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "merged"):  # as if killed after checkpoint-3
        path = tmp_path / "fsdp" / name
        path.unlink() if path.is_file() else shutil.rmtree(path)
    proc = _run(tmp_path / "fsdp", 2, data, (*saved, "--sft.resume_from_checkpoint", "latest"), fsdp=True)
    assert proc.returncode == 0 and "has no final model: saving it from" in proc.stdout + proc.stderr, proc.stderr
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    one, two = (AutoModelForCausalLM.from_pretrained(tmp_path / run / "merged").eval() for run in ("one", "fsdp"))
    base = AutoModelForCausalLM.from_pretrained(TINY).eval()
    with torch.no_grad():
        expected = one(input_ids=ids).logits
        torch.testing.assert_close(two(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-3)  # the adapter did something
    assert not (tmp_path / "fsdp" / "merged-adapter").exists()
    from safetensors.torch import load_file

    for run in ("one", "fsdp"):  # the final adapter as trained (float32 LoRA), no base config.json beside it
        assert {v.dtype for v in load_file(tmp_path / run / "adapter_model.safetensors").values()} == {torch.float32}
        assert not (tmp_path / run / "config.json").exists()


def test_fsdp2_rl_measures_the_held_out_rows_before_training(tmp_path):
    """vf-rl's held-out generation before RL ran before accelerate had sharded the weights: the processes other
    than 0 (which alone reads them, cpu_ram_efficient_loading) failed on meta tensors. The FSDP2 run now prints both
    measurements, and trains the losses of a run loading the weights on every process."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": r["prompt"], "answer": r["completion"][0]["content"]}
                                              for r in addition_rows(64)])
    args = ["rl", "--model", TINY, "--dataset", data, "--rl.max_steps", "2", "--rl.batch_size", "16",
            "--rl.rollouts_per_example", "4", "--rl.micro_batch_size", "4", "--rl.max_prompt_len", "24",
            "--rl.max_new_tokens", "4", "--rl.max_seq_len", "32", "--rl.eval_size", "8",
            "--rl.eval_generation_rows", "8", "--rl.logging_steps", "1", "--rl.fsdp", "true", "--rl.save_strategy",
            "no", "--rl.disable_tqdm", "true"]
    losses = {}
    for run, extra in (("default", []), ("every-rank", ["--rl.fsdp_config", "{cpu_ram_efficient_loading = false}"])):
        port = str(29400 + os.getpid() % 1000)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               port, str(ROOT / "tests" / "cpu_fsdp.py"), *args, *extra, "--rl.output_dir",
                               str(tmp_path / run)], cwd=ROOT, env=worker_env(), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.count("held-out exact-match accuracy before RL") == 1
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        losses[run] = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
    assert len(losses["default"]) == 2 and losses["default"] == pytest.approx(losses["every-rank"], abs=1e-6)


def test_fsdp2_pushes_gathered_weights_to_an_openai_server(tmp_path, reference):
    """Sampling through a server with sharded weights: every process helps gather them, rank 0 pushes and asks;
    the samples of the last step are what the final model generates. With activation checkpointing of every
    layer, the curve is the 1-process one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vftrain.sampling.embedded import generate
    from vftrain.serve import serve

    data, one, _ = reference
    server = serve(TINY, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        extra = ("--sft.fsdp", "true", *SAMPLING, "--sft.sample_backend", "openai", "--sft.sample_base_url", url,
                 *_checkpointing(1))
        records, stdout = _train(tmp_path / "out", 2, data, extra, fsdp=True)
    finally:
        server.shutdown()
    _assert_same_curve(one, records)  # activation checkpointing of every layer inside FSDP2 recomputes exactly
    rewards = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rewards if "eval/reward" in r] == [3, 6]
    # The held-out rows are the data's last two; the final model is the run's output folder.
    rows = [json.loads(line) for line in open(data)][-2:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    local = generate(model, AutoTokenizer.from_pretrained(tmp_path / "out"), [r["prompt"] for r in rows], 6)
    assert _completions(stdout)[-2:] == [c.strip() for c in local]
    base = generate(AutoModelForCausalLM.from_pretrained(TINY), AutoTokenizer.from_pretrained(TINY),
                    [r["prompt"] for r in rows], 6)
    assert base != local  # so the server did not just keep serving the base model


def _completions(stdout: str) -> list[str]:
    """The completions of the sample panels, without the mark of one cut by max_new_tokens."""
    return [line.split("completion", 1)[1].strip(" │").removesuffix(" (truncated: max_new_tokens)")
            for line in stdout.splitlines() if "│ completion" in line]


def test_fsdp_that_cannot_shard_is_an_error(tmp_path):
    """One process has nothing to shard over; on CPU processes accelerate would silently run DDP instead."""
    data = _dataset(tmp_path)
    proc = _run(tmp_path / "one", 1, data, ("--sft.fsdp", "true"))
    assert proc.returncode == 2
    assert "fsdp shards over several processes, but this is one" in proc.stderr
    proc = _run(tmp_path / "two", 2, data, ("--sft.fsdp", "true"))
    assert proc.returncode != 0
    assert "fsdp is set but accelerate did not shard the model" in proc.stderr


def test_processes_that_found_different_checkpoints_are_refused_before_the_folder_changes(tmp_path):
    """Each process resolves 'latest' on its own; a checkpoint published between their lookups made rank 0 set the
    folder up for checkpoint-2 (moving checkpoint-4 aside) while rank 1 resumed checkpoint-4, and the run died in
    gloo. Both processes now stop with one error, and nothing moves."""
    from conftest import run_worker

    out = tmp_path / "run"
    first = run_worker(out, max_steps=4, processes=2)
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(os.listdir(out))
    skewed = run_worker(out, max_steps=6, processes=2, resume_skew=True)
    assert skewed.returncode != 0
    assert "the processes found different checkpoints to resume from" in skewed.stderr, skewed.stderr[-3000:]
    assert sorted(os.listdir(out)) == before


SKEWED_LATEST = """
import os, sys
import transformers.trainer_utils
if os.environ["RANK"] == "1":  # as when checkpoint-4 was published between the processes' lookups of 'latest'
    transformers.trainer_utils.get_last_checkpoint = lambda folder: os.path.join(folder, "checkpoint-2")
from vftrain.cli.sft import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_requeued_cli_run_whose_processes_found_different_checkpoints_stops_on_every_process(tmp_path):
    """The CLI decided on each process whether the run was finished before any collective: rank 0 found the last
    checkpoint (finished, exit 0) while rank 1 found the one before and waited for rank 0 in its first collective.
    Both now stop with one error, and nothing in the folder moves."""
    data, out = _dataset(tmp_path), tmp_path / "run"
    steps = ("--sft.max_steps", "4", "--sft.save_strategy", "steps", "--sft.save_steps", "2",
             "--sft.resume_from_checkpoint", "latest")
    _train(out, 2, data, steps)
    before = sorted(os.listdir(out))
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED_LATEST)
    proc = _run(out, 2, data, steps, program=[str(script)], timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("the processes found different checkpoints to resume from") == 2, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == before
