"""What a new user meets after the README (issue 22, review newcomer-2026-12-02): held-out rows that really are held
out, run folders that hold one run, the held-out accuracy written down, a re-runnable config.toml, and messages
that say what happened (context length, TRL batch fields, rows held out, where the model went)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY, addition_rows, small_config, write_jsonl
from vftrain.cli.sft import main
from vftrain.errors import ConfigError, DataError


def _data_file(tmp_path, n=64) -> str:
    return write_jsonl(tmp_path / "add.jsonl", addition_rows(n))


def _sft(tmp_path, capsys, *extra, out="run", steps=2, data=None):
    """`vf-sft` in process on the tiny model; (exit code, stdout, stderr)."""
    data = data or _data_file(tmp_path)
    argv = ["--model", TINY, "--dataset", data, "--sft.output_dir", str(tmp_path / out), "--sft.max_steps", str(steps),
            "--sft.batch_size", "8", "--sft.micro_batch_size", "8", "--sft.max_seq_len", "64",
            "--sft.logging_steps", "1", "--sft.save_steps", "2", "--sft.disable_tqdm", "true", *extra]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> bool:
    """One `vf-sft: error:` line and no traceback (progress bars may share stderr)."""
    return "Traceback" not in err and sum(line.startswith("vf-sft: error: ") for line in err.splitlines()) == 1


def _metric_steps(run: Path, key="loss") -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


# ---- 4. a single file has one split; eval_size cuts a real held-out split out of it
def test_a_single_file_has_no_test_split(tmp_path, capsys):
    from vftrain.data.load import load_rows

    with pytest.raises(DataError, match="holds one split, 'train', not 'test'.*eval_size"):
        load_rows(_data_file(tmp_path), "test")
    code, out, err = _sft(tmp_path, capsys, "--sft.eval_split", "test", "--sft.eval_generation_rows", "4")
    assert code == 2 and "not 'test'" in err and "held-out exact-match" not in out
    assert _one_error_line(err)


def test_eval_size_holds_rows_out_of_training(tmp_path, caplog):
    import vftrain as vf

    data = _data_file(tmp_path, 40)
    prompts = lambda rows: [r["prompt"][0]["content"] for r in rows]  # noqa: E731
    with caplog.at_level("INFO", logger="vftrain"):
        trainer = vf.SFTTrainer(model=TINY, args=small_config(tmp_path, dataset=data, eval_size=0.2,
                                                              sample_every_n_steps=1, num_samples=2))
    held = prompts(trainer.raw_eval)
    assert len(held) == 8 and trainer.eval_report.rows_kept == 8 and trainer.train_report.rows_in == 32
    assert "8 of 40 training rows held out as the eval split" in caplog.text
    sampler = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "pairs"))
    assert {p.messages[-1]["content"] for p, _ in sampler.pairs} <= set(held)  # panels show held-out rows
    assert trainer.args.eval_strategy.value == "steps"  # an eval loss on the held-out rows
    again = vf.SFTTrainer(model=TINY, args=small_config(tmp_path / "again", dataset=data, eval_size=8))
    assert prompts(again.raw_eval) == held  # the same rows for the same seed
    with pytest.raises(ConfigError, match="eval_size = 8 and eval_split = 'test' both"):
        small_config(tmp_path, eval_size=8, eval_split="test")


# ---- 5. one run per folder: a new run is refused (or overwrites when told), a resumed run continues its files
def test_a_new_run_into_another_runs_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert _sft(tmp_path, capsys, steps=3)[0] == 0
    before = (run / "metrics.jsonl").read_text()
    code, _, err = _sft(tmp_path, capsys, steps=2)
    assert code == 2 and _one_error_line(err)
    assert "holds another run's outputs (checkpoint-2, checkpoint-3" in err
    assert all(way in err for way in ("run_name", "resume_from_checkpoint = 'latest'", "overwrite_output_dir"))
    assert (run / "metrics.jsonl").read_text() == before  # nothing of the old run touched


def test_overwrite_output_dir_deletes_the_old_run_and_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert _sft(tmp_path, capsys, steps=3)[0] == 0
    code, out, _ = _sft(tmp_path, capsys, "--sft.overwrite_output_dir", "true", steps=2)
    assert code == 0
    assert "overwrite_output_dir: deleting the earlier run's checkpoint-2, checkpoint-3" in out
    assert _metric_steps(run) == [1, 2]  # one run in metrics.jsonl
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    code, _, err = _sft(tmp_path, capsys, "--sft.overwrite_output_dir", "true", "--sft.resume_from_checkpoint",
                        "latest")
    assert code == 2 and "set one of them" in err and _one_error_line(err)


def test_a_resumed_run_continues_its_own_files(tmp_path, capsys):
    """A run that got past its last checkpoint (step 2) to step 3 before it stopped: resuming drops step 3's lines,
    so metrics.jsonl (and the summary and plot read from it) holds each step once."""
    run = tmp_path / "run"
    assert _sft(tmp_path, capsys, steps=3, out="run")[0] == 0
    for name in ("checkpoint-3", "model.safetensors"):  # as if stopped after step 3's log, before its save
        target = run / name
        __import__("shutil").rmtree(target) if target.is_dir() else target.unlink()
    code, out, err = _sft(tmp_path, capsys, "--sft.resume_from_checkpoint", "latest", steps=4)
    assert code == 0, err[-2000:]
    assert _metric_steps(run) == [1, 2, 3, 4]


def test_resuming_before_later_checkpoints_sets_them_aside(tmp_path, capsys):
    """A resume from an earlier checkpoint replaces the continuation that wrote the later ones: they are kept in a
    superseded-* folder (named in the log) and are no longer what 'latest' or the metrics show."""
    run = tmp_path / "run"
    assert _sft(tmp_path, capsys, steps=4)[0] == 0
    code, out, err = _sft(tmp_path, capsys, "--sft.resume_from_checkpoint", str(run / "checkpoint-2"),
                          "--sft.save_steps", "3", steps=3)
    assert code == 0, err[-2000:]
    aside = list(run.glob("superseded-*/checkpoint-4"))
    assert len(aside) == 1 and "superseded-" in out + err
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert _metric_steps(run) == [1, 2, 3]


# ---- 10, 19. the held-out accuracy is written down, and the run says where its model went
def test_held_out_accuracy_is_written_to_the_run_folder_and_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _sft(tmp_path, capsys, "--sft.eval_size", "6", "--sft.eval_generation_rows", "4",
                          "--sft.max_new_tokens", "4")
    assert code == 0, err[-2000:]
    saved = json.loads((run / "held_out-step2.json").read_text())
    assert saved["rows"] == 4 and len(saved["generations"]) == 4 and saved["step"] == 2
    first = saved["generations"][0]
    assert set(first) == {"prompt", "completion", "reference", "exact_match"} and first["prompt"][0]["role"] == "user"
    assert saved["accuracy"] == sum(g["exact_match"] for g in saved["generations"]) / 4
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "eval/held_out_accuracy" in r]
    assert logged == [pytest.approx({**logged[0], "step": 2, "eval/held_out_accuracy": saved["accuracy"],
                                     "eval/held_out_rows": 4})]
    assert f"model saved to {run}\n" in out
    assert f"(4 rows of eval_size = 6; generations in {run / 'held_out-step2.json'})" in out


def test_python_users_evaluate_the_held_out_rows(tmp_path):
    import vftrain as vf

    trainer = vf.SFTTrainer(model=TINY, args=small_config(tmp_path, dataset=_data_file(tmp_path), eval_size=5,
                                                          max_new_tokens=4))
    result = trainer.evaluate_generations()
    assert result["n"] == 5 and Path(result["path"]).name == "held_out-step0.json"
    with pytest.raises(ConfigError, match="needs held-out rows"):
        vf.SFTTrainer(model=TINY, args=small_config(tmp_path / "b", dataset=_data_file(tmp_path))
                      ).evaluate_generations()


def test_a_lora_run_says_where_the_adapter_and_the_merged_model_went(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _sft(tmp_path, capsys, "--sft.use_lora", "true", "--sft.merge_lora", "true")
    assert code == 0, err[-2000:]
    assert f"LoRA adapter saved to {run}; merged model written to {run / 'merged'}" in out


# ---- 14, 17. the data report counts every row: held out for panels, left out of each epoch; TRL batch fields
def test_the_data_report_says_which_rows_are_not_trained(tmp_path, caplog):
    import vftrain as vf

    data = _data_file(tmp_path, 20)
    with caplog.at_level("INFO", logger="vftrain"):
        vf.SFTTrainer(model=TINY, args=small_config(tmp_path, dataset=data, max_steps=-1, num_train_epochs=1,
                                                    sample_every_n_steps=1, num_samples=2))
    assert "18 rows kept from 18 dataset rows" in caplog.text
    assert "2 rows held out of training for the sample panels" in caplog.text
    assert "an epoch is 2 steps of 8 rows: 16 rows trained per epoch, 2 left out" in caplog.text


def test_trl_batch_fields_get_the_whole_translation_in_one_message(tmp_path):
    import vftrain as vf

    with pytest.raises(ConfigError, match=r"per_device_train_batch_size = 16 disagrees.*set micro_batch_size = 16 "
                                          r"and batch_size = 16 x 4 x world_size 1 = 64"):
        vf.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, gradient_accumulation_steps=4)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps = 4 disagrees.*set micro_batch_size = 8 "
                                          r"and batch_size = 8 x 4 x world_size 1 = 32"):
        vf.SFTConfig(output_dir=str(tmp_path), gradient_accumulation_steps=4)


# ---- 9. a sequence length beyond the model's context is said before training
def test_a_length_beyond_the_context_is_a_warning_naming_both_numbers(tmp_path, caplog):
    import datasets

    import vftrain as vf

    rows = datasets.Dataset.from_list(addition_rows(16))
    with caplog.at_level("WARNING", logger="vftrain"):
        vf.SFTTrainer(model=TINY, train_dataset=rows, args=small_config(tmp_path, max_seq_len=1024))
    assert "max_seq_len = 1,024 is beyond the model's context of 256 tokens (max_position_embeddings 256" in caplog.text
    caplog.clear()
    config = vf.RLConfig(output_dir=str(tmp_path / "rl"), max_prompt_len=200, max_new_tokens=100, max_seq_len=300,
                         batch_size=8, rollouts_per_example=4, disable_tqdm=True, save_strategy="no")
    with caplog.at_level("WARNING", logger="vftrain"):
        vf.RLTrainer(model=TINY, train_dataset=rows, args=config)
    assert "max_prompt_len + max_new_tokens = 200 + 100 = 300 is beyond the model's context of 256" in caplog.text


# ---- 21. the run folder holds a config.toml that vf-sft / vf-rl read back into the same config
@pytest.mark.parametrize("section", ["sft", "rl"])
def test_config_toml_reruns_the_same_config(tmp_path, section):
    from vftrain.cli.args import parse_argv
    from vftrain.cli.sft import resolve
    from vftrain.config import RLConfig, SFTConfig

    cls = SFTConfig if section == "sft" else RLConfig
    table = dict(run_name="a \"quoted\" name", learning_rate=3e-4, report_to=["all"], eval_size=0.1,
                 lr_scheduler_kwargs={"min_lr_rate": 0.1}, output_dir=str(tmp_path / "elsewhere"), batch_size=32,
                 micro_batch_size=16, max_seq_len=64, lr_scheduler_type="cosine_with_min_lr")
    if section == "rl":
        table.update(max_prompt_len=24, max_new_tokens=8, rollouts_per_example=4, scale_rewards="group")
    config = cls(dataset=_data_file(tmp_path), **table)
    config.save_resolved(str(tmp_path / "run"), extra={"model": TINY})
    model, again = resolve(parse_argv(["@", str(tmp_path / "run" / "config.toml")], section, {}), cls, section)
    assert model == TINY and again.to_dict() == config.to_dict()


def test_the_rl_plot_has_the_panels_an_rl_user_reads(tmp_path, monkeypatch):
    import matplotlib.axes

    from vftrain.logging import curve_panels, plot_curves

    records = [{"step": s, "loss": 0.1, "reward": 0.5 + s / 10, "reward/exact_match": 0.4 + s / 10,
                "reward/format": 0.9, "completion_len": 8.0 + s, "completion_len_max": 12, "entropy": 0.7,
                "frac_reward_zero_std": 0.25, "kl": 1e-3, "mismatch_kl": 1e-8, "importance_ratio": 1.0,
                "importance_ratio_min": 0.9, "importance_ratio_max": 1.1, "tokens_per_second": 31000.0 + 100 * s}
               for s in range(1, 6)]
    panels = dict(curve_panels(records))
    assert [label for label, _ in panels["reward"]] == ["rollouts", "exact_match", "format"]
    for title in ("completion length (tokens)", "frac_reward_zero_std", "entropy", "KL", "importance ratio"):
        assert title in panels, title
    bottoms = {}
    real = matplotlib.axes.Axes.set_title

    def spy(ax, title, *args, **kwargs):
        bottoms[title] = ax.get_ylim()[0]
        return real(ax, title, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", spy)
    assert plot_curves(records, str(tmp_path / "c.png"))
    assert bottoms["tokens / s"] == 0  # a 31k-32k wobble is not drawn as a collapse
