"""Run folders and resume (review of 2026-12 merges): the config's `resume_from_checkpoint` and 'latest' through the
Python API, 'latest' on a folder without a checkpoint, evaluation before training, the data-change warning for
eval_size, overwrite_output_dir and the input model, a requeued finished run, and RL's rollouts.jsonl after a
restart."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from transformers import TrainerCallback

import vftrain as vf
from conftest import TINY, addition_rows, small_config
from vftrain.errors import ConfigError


def _rows(n=64):
    return datasets.Dataset.from_list(addition_rows(n))


def _sft(tmp_path, **overrides):
    """An SFT trainer on the tiny model writing checkpoints every 2 steps to tmp_path/out."""
    args = small_config(tmp_path, **{**dict(save_strategy="steps", save_steps=2), **overrides})
    return vf.SFTTrainer(model=TINY, train_dataset=_rows(), args=args)


def _trained(trainer) -> list[int]:
    """The steps `trainer` will train (filled in as it trains)."""
    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer.add_callback(Count())
    return steps


def _logged(run: Path, key="loss") -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


# ---- 1. the config's resume_from_checkpoint, and 'latest' as train()'s argument
def test_config_latest_continues_through_the_python_api(tmp_path):
    run = tmp_path / "out"
    _sft(tmp_path, max_steps=2).train()
    trainer = _sft(tmp_path, max_steps=3, resume_from_checkpoint="latest")
    steps = _trained(trainer)
    trainer.train()
    assert steps == [3] and _logged(run) == [1, 2, 3]  # from checkpoint-2, earlier lines kept


def test_latest_as_the_train_argument(tmp_path):
    run = tmp_path / "out"
    fresh = _sft(tmp_path, max_steps=2)
    fresh.train(resume_from_checkpoint="latest")  # no checkpoint yet: a fresh start
    assert fresh.state.global_step == 2 and _logged(run) == [1, 2]
    again = _sft(tmp_path, max_steps=4)
    steps = _trained(again)
    again.train(resume_from_checkpoint="latest")
    assert steps == [3, 4] and _logged(run) == [1, 2, 3, 4]


# ---- 2. 'latest' without a checkpoint starts fresh only in a folder without another run's outputs
def _cli(tmp_path, capsys, *extra, steps=2):
    """`vf-sft` in process on the tiny model into tmp_path/out: (exit code, stdout, stderr)."""
    from vftrain.cli.sft import main

    data = tmp_path / "add.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(64)))
    code = main(["--model", TINY, "--dataset", str(data), "--sft.output_dir", str(tmp_path / "out"),
                 "--sft.max_steps", str(steps), "--sft.batch_size", "8", "--sft.micro_batch_size", "8",
                 "--sft.max_seq_len", "64", "--sft.logging_steps", "1", "--sft.disable_tqdm", "true", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> bool:
    return "Traceback" not in err and sum(line.startswith("vf-sft: error: ") for line in err.splitlines()) == 1


def test_latest_without_a_checkpoint_does_not_replace_a_finished_run(tmp_path, capsys):
    run = tmp_path / "out"
    assert _cli(tmp_path, capsys, "--sft.save_strategy", "no", "--sft.eval_size", "8",
                "--sft.eval_generation_rows", "2", "--sft.max_new_tokens", "2")[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert {"metrics.jsonl", "model.safetensors", "held_out-step2.json"} <= set(before)
    code, _, err = _cli(tmp_path, capsys, "--sft.resume_from_checkpoint", "latest", "--sft.save_strategy", "no",
                        steps=3)
    assert code == 2 and _one_error_line(err)
    assert "holds another run's outputs (held_out-step2.json, metrics.jsonl, model.safetensors" in err
    assert "no checkpoint to continue it from" in err and "run_name" in err and "overwrite_output_dir" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing touched


def test_latest_restarts_a_run_killed_before_its_first_save(tmp_path, capsys):
    """A job killed (SIGKILL) before its first checkpoint left only its logs: the same command line restarts it from
    step 0, and the logs then show that run once."""
    run = tmp_path / "out"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")  # what the killed job logged
    code, _, err = _cli(tmp_path, capsys, "--sft.resume_from_checkpoint", "latest", steps=2)
    assert code == 0, err[-2000:]
    assert _logged(run) == [1, 2] and json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"] != 9.0


# ---- 3. evaluation before training claims the folder; train() then continues what it wrote
@pytest.mark.parametrize("first", ["evaluate", "evaluate_generations"])
def test_evaluation_before_training_then_training(tmp_path, first):
    run = tmp_path / "out"
    trainer = _sft(tmp_path, eval_size=8, eval_generation_rows=2, max_new_tokens=2)
    getattr(trainer, first)()
    trainer.train()
    assert trainer.state.global_step == 2 and _logged(run) == [1, 2]
    key = "eval_loss" if first == "evaluate" else "eval/held_out_accuracy"
    assert _logged(run, key)[0] == 0  # the evaluation before step 1 kept
    trainer.evaluate_generations()  # and after training, as before
    assert (run / "held_out-step2.json").exists()


def test_evaluation_into_another_runs_folder_is_refused_before_it_writes(tmp_path):
    _sft(tmp_path, eval_size=8).train()
    before = (tmp_path / "out" / "metrics.jsonl").read_text()
    other = _sft(tmp_path, eval_size=8, eval_generation_rows=2, max_new_tokens=2)
    for evaluation in (other.evaluate, other.evaluate_generations):
        with pytest.raises(ConfigError, match="holds another run's outputs"):
            evaluation()
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == before
    assert not list((tmp_path / "out").glob("held_out-*"))


# ---- 4. the data-change warning knows eval_size
def test_resume_with_another_eval_size_warns_and_samples_from_it_do_not(tmp_path, caplog):
    _sft(tmp_path, eval_size=8, sample_every_n_steps=2, num_samples=2, max_new_tokens=2).train()

    def resume_warnings(**overrides) -> str:
        caplog.clear()
        with caplog.at_level("WARNING", logger="vftrain"):
            _sft(tmp_path, max_steps=3, **overrides).train(resume_from_checkpoint=str(tmp_path / "out/checkpoint-2"))
        return " ".join(r.getMessage() for r in caplog.records if "other data settings" in r.getMessage())

    assert resume_warnings(eval_size=8) == ""  # the panels' rows came from the eval_size cut: none held out of training
    assert "eval_size: 8 -> 12" in resume_warnings(eval_size=12)


# ---- 5. overwrite_output_dir never deletes the model the run loads
def test_overwrite_output_dir_keeps_a_model_inside_it(tmp_path):
    import shutil

    run = tmp_path / "out"
    shutil.copytree(TINY, run / "merged")  # an earlier run's merged model, fine-tuned further into its own folder
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    adapter = tmp_path / "adapter"  # a LoRA adapter whose base lies in that folder
    lora = vf.SFTTrainer(model=str(run / "merged"), train_dataset=_rows(),
                         args=small_config(tmp_path / "lora", max_steps=1, use_lora=True))
    lora.save_model(str(adapter))
    files = sorted(p.name for p in (run / "merged").iterdir())
    for model in (run / "merged", adapter):
        trainer = vf.SFTTrainer(model=str(model), train_dataset=_rows(),
                                args=small_config(tmp_path, overwrite_output_dir=True, use_lora=model == adapter))
        with pytest.raises(ConfigError, match=r"overwrite_output_dir = true would delete the model this run loads"):
            trainer.train()
        assert sorted(p.name for p in (run / "merged").iterdir()) == files and (run / "metrics.jsonl").exists()


# ---- 6. a requeued finished run trains nothing and rewrites nothing
def _rl(tmp_path, max_steps, **overrides):
    from rl_worker import config

    args = config(str(tmp_path / "out"), max_steps, **{**dict(batch_size=8, micro_batch_size=8), **overrides})
    return vf.RLTrainer(model=TINY, train_dataset=_rows(12), args=args, reward_funcs=[lambda c, r: float(len(c))])


@pytest.mark.parametrize("kind", ["sft", "rl"])
def test_resuming_a_finished_run_trains_nothing(tmp_path, caplog, kind):
    make = (lambda **kw: _sft(tmp_path, **kw)) if kind == "sft" else (lambda **kw: _rl(tmp_path, 2, **kw))
    first = make()
    first.train()
    run = tmp_path / "out"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = make(resume_from_checkpoint="latest")
    steps = _trained(again)
    with caplog.at_level("INFO", logger="vftrain"):
        again.train()
    assert steps == [] and again.state.global_step == 2
    # the checkpoint's weights, not the start's: a save_model() after train() saved the untrained model before
    trained = first.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in again.model.state_dict().items())
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert "checkpoint-2 is step 2 of 2: the run is finished, nothing to train" in caplog.text


def test_a_requeued_finished_cli_run_exits_0_and_rewrites_nothing(tmp_path, capsys):
    run = tmp_path / "out"
    latest = ("--sft.resume_from_checkpoint", "latest", "--sft.save_steps", "2", "--sft.eval_size", "8",
              "--sft.eval_generation_rows", "2", "--sft.max_new_tokens", "2")
    assert _cli(tmp_path, capsys, *latest)[0] == 0
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    assert run / "model.safetensors" in files and run / "held_out-step2.json" in files
    code, out, err = _cli(tmp_path, capsys, *latest)
    assert code == 0, err[-2000:]
    assert "the run is finished, nothing to train" in out + err and "held-out exact-match" not in out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()} == files


def test_a_requeued_run_killed_after_its_last_checkpoint_saves_its_model(tmp_path, capsys):
    """Killed after the last checkpoint but before the final save (a 7B save, a merge and held-out generation take
    minutes): the requeue said "finished", exited 0 and left no model. Now it saves the checkpoint's weights and
    runs the held-out generation."""
    from safetensors.torch import load_file

    run = tmp_path / "out"
    latest = ("--sft.resume_from_checkpoint", "latest", "--sft.save_steps", "2", "--sft.eval_size", "8",
              "--sft.eval_generation_rows", "2", "--sft.max_new_tokens", "2")
    assert _cli(tmp_path, capsys, *latest)[0] == 0
    for name in ("model.safetensors", "held_out-step2.json"):
        (run / name).unlink()  # as if killed after checkpoint-2 was published
    code, out, err = _cli(tmp_path, capsys, *latest)
    assert code == 0, err[-2000:]
    assert "has no final model: saving it from" in out + err and "held-out exact-match" in out
    saved, final = load_file(run / "model.safetensors"), load_file(run / "checkpoint-2" / "model.safetensors")
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in final)
    assert (run / "held_out-step2.json").exists() and _logged(run) == [1, 2]


@pytest.mark.parametrize("first, then, change", [
    ((), ("--sft.use_lora", "true"), "use_lora: False -> True"),
    (("--sft.use_lora", "true"), ("--sft.use_lora", "false"), "use_lora: True -> False"),
    (("--sft.use_lora", "true"), ("--sft.use_lora", "true", "--sft.lora_rank", "16"), "lora_rank: 8 -> 16"),
])
def test_a_resume_with_other_model_settings_is_one_line_error(tmp_path, capsys, first, then, change):
    """Before: transformers' tracebacks (an optimizer group of another size, no checkpoint index, a size mismatch
    of lora_A), after the model was loaded and the data tokenized. Now refused first, naming the change; the
    API's train() refuses it too."""
    assert _cli(tmp_path, capsys, "--sft.save_steps", "2", *first)[0] == 0
    code, _, err = _cli(tmp_path, capsys, "--sft.resume_from_checkpoint", "latest", *then, steps=4)
    assert code == 2 and _one_error_line(err)
    assert f"checkpoint-2 was saved with other model settings than this run's ({change}); resume with" in err
    lora = dict(zip(then[::2], then[1::2])).get("--sft.lora_rank")
    args = small_config(tmp_path, max_steps=4, use_lora=then[1] == "true", **({"lora_rank": int(lora)} if lora else {}))
    with pytest.raises(ConfigError, match="other model settings"):
        vf.SFTTrainer(model=TINY, train_dataset=_rows(), args=args).train(resume_from_checkpoint="latest")


# ---- 7. a resumed RL run's rollouts.jsonl is trimmed with metrics.jsonl, before the first step
def test_resumed_rl_run_trims_rollouts_with_metrics_at_its_start(tmp_path):
    _rl(tmp_path, 2, save_steps=1).train()
    run = tmp_path / "out"

    def broken(completion, reference):
        raise RuntimeError("reward server down")

    resumed = vf.RLTrainer(model=TINY, train_dataset=_rows(12), args=_rl(tmp_path, 3, save_steps=1).args,
                           reward_funcs=[broken])
    with pytest.raises(RuntimeError, match="reward server down"):  # fails at its first step, before any record
        resumed.train(resume_from_checkpoint=str(run / "checkpoint-1"))
    rollouts = Counter(json.loads(line)["step"] for line in (run / "rollouts.jsonl").read_text().splitlines())
    assert rollouts == {1: 8} and set(_logged(run)) == {1}  # the two files agree: step 1, once


def test_a_second_train_call_is_refused_not_started_over(tmp_path):
    """train() twice on one trainer started over at step 1 in the same folder: checkpoint-2 replaced, the log
    holding steps 1, 2, 1, 2. Continuing it with 'latest' and a larger max_steps works."""
    trainer = _sft(tmp_path)
    trainer.train()
    with pytest.raises(ConfigError, match=r"^train\(\) already ran 2 steps on this trainer: continue with"):
        trainer.train()
    trainer.args.max_steps = 4
    trainer.train(resume_from_checkpoint="latest")
    assert trainer.state.global_step == 4 and _logged(tmp_path / "out") == [1, 2, 3, 4]
