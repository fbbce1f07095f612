"""Leftovers of issues 18 and 22: vftrain.serve's gaps (model ids, stop strings, top logprobs, stream, Hermes tool
calls, LoRA adapter folders), truncation marks from the OpenAI backend, reward modules beside the TOML, held-out
settings that would be skipped, RL's held-out reward, every unknown top-level key in one error, and peft's
deprecation warning on adapter folders."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, addition_rows, write_jsonl


def _one_error_line(err: str, prog: str = "vf-sft") -> bool:
    """One `<prog>: error:` line and no traceback (progress bars may share stderr)."""
    return "Traceback" not in err and sum(line.startswith(f"{prog}: error: ") for line in err.splitlines()) == 1


# ---- 7. every unknown top-level key in one error
def test_unknown_top_level_keys_are_listed_together(tmp_path, capsys):
    from vftrain.cli.sft import main

    data = write_jsonl(tmp_path / "add.jsonl", addition_rows(8))
    toml = tmp_path / "c.toml"
    toml.write_text(f'model = "{TINY}"\ndataset = "{data}"\nlearning_rate = 1e-5\nmax_steps = 3\nmodle = "x"\n'
                    "[sft]\nbatch_size = 8\n")
    assert main(["@", str(toml)]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err)
    line = next(x for x in err.splitlines() if x.startswith("vf-sft: error: "))
    assert "3 unknown top-level keys" in line
    assert "'learning_rate' (a field of the [sft] table: move it below the [sft] line)" in line
    assert "'max_steps' (a field of the [sft] table" in line and "'modle' (did you mean 'model'?)" in line


# ---- 4. a reward module beside the TOML, the run started from another folder
def test_reward_module_beside_the_config_is_found_from_another_folder(tmp_path, capsys, monkeypatch):
    import sys

    from vftrain import rewards
    from vftrain.cli.rl import main

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(rewards, "IMPORT_FOLDERS", [], raising=False)  # a fresh list per test
    sub, elsewhere = tmp_path / "sub", tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = write_jsonl(sub / "add.jsonl", addition_rows(8))
    (sub / "leftovers_beside_rewards.py").write_text("def close(completion, reference):\n    return 1.0\n")
    (sub / "rl.toml").write_text(f'model = "{TINY}"\ndataset = "{data}"\n[rl]\n'
                                 'reward_funcs = ["leftovers_beside_rewards:close"]\n')
    monkeypatch.chdir(elsewhere)
    assert main(["@", "../sub/rl.toml", "--inspect", "1"]) == 0, capsys.readouterr().err
    assert "reward functions: leftovers_beside_rewards:close" in capsys.readouterr().out
    # the current folder comes first: a module of the same name there wins
    assert sys.path.index(str(elsewhere)) < sys.path.index(str(sub))


# ---- 5. eval_generation_rows with nothing held out is said, not skipped without a word
def test_eval_generation_rows_without_held_out_rows_is_warned(tmp_path, capsys):
    from vftrain.cli.sft import main

    data = write_jsonl(tmp_path / "add.jsonl", addition_rows(16))
    code = main(["--model", TINY, "--dataset", data, "--sft.output_dir", str(tmp_path / "run"), "--sft.max_steps", "1",
                 "--sft.batch_size", "8", "--sft.micro_batch_size", "8", "--sft.max_seq_len", "64",
                 "--sft.disable_tqdm", "true", "--sft.eval_generation_rows", "4"])
    out = capsys.readouterr().out
    assert code == 0
    warned = [line for line in out.splitlines() if "eval_generation_rows = 4 is skipped" in line]
    assert len(warned) == 1 and "eval_split" in warned[0] and "eval_size" in warned[0]


# ---- 3. the OpenAI backend marks completions cut by max_new_tokens, as the embedded backend does
@pytest.mark.parametrize("max_new_tokens, truncated", [(1, True), (8, False)])
def test_openai_backend_marks_truncated_samples(tmp_path, max_new_tokens, truncated):
    import datasets

    import vftrain as vf
    from conftest import ROOT, small_config
    from vftrain.sampling import ChatPrompt
    from vftrain.sampling.openai_backend import OpenAIBackend
    from vftrain.serve import serve

    model = str(ROOT / "assets" / "addition-noisy-sft")  # answers a sum and stops within a few tokens
    server = serve(model, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        args = small_config(tmp_path, sample_backend="openai", sample_base_url=url, max_new_tokens=max_new_tokens)
        trainer = vf.SFTTrainer(model=model, train_dataset=datasets.Dataset.from_list(addition_rows(16)), args=args)
        [chat] = OpenAIBackend(trainer)([ChatPrompt([{"role": "user", "content": "12+34"}])], step=0)
    finally:
        server.shutdown()
        server.server_close()
    assert chat.truncated is truncated


# ---- 8. no peft deprecation warning when a LoRA adapter folder is the model
def test_adapter_folder_loads_without_peft_deprecation_warning(tmp_path):
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from vftrain.models import get_model_and_tokenizer

    folder = str(tmp_path / "adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), LoraConfig(task_type="CAUSAL_LM", r=4)) \
        .save_pretrained(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = get_model_and_tokenizer(folder, packing=False)
    assert hasattr(model, "peft_config")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


# ---- 6. RL's held-out figure: the run's reward functions' score beside exact match
def test_rl_held_out_reports_the_run_reward(tmp_path, capsys):
    from conftest import ROOT
    from vftrain.cli.rl import main

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", addition_rows(16))
    write_jsonl(data / "test.jsonl", addition_rows(4, start=50))
    # a custom reward that exact match cannot stand for: the completion's length, weighted by 0.5
    (tmp_path / "length_reward.py").write_text("def length(completion, reference):\n    return len(completion)\n")
    out = tmp_path / "run"
    code = main(["--model", str(ROOT / "assets" / "addition-noisy-sft"), "--dataset", str(data),
                 "--rl.reward_funcs", f'["{tmp_path / "length_reward.py"}:length"]', "--rl.reward_weights", "[0.5]",
                 "--rl.eval_split", "test", "--rl.eval_generation_rows", "4", "--rl.output_dir", str(out),
                 "--rl.max_steps", "1", "--rl.batch_size", "4", "--rl.micro_batch_size", "4",
                 "--rl.rollouts_per_example", "2", "--rl.max_new_tokens", "6", "--rl.max_seq_len", "40", "--rl.max_prompt_len", "30",
                 "--rl.disable_tqdm", "true", "--rl.save_strategy", "no"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-2000:]
    record = json.loads((out / "held_out-step0.json").read_text())
    lengths = [len(g["completion"]) for g in record["generations"]]
    assert record["scored_by"] == "exact_match" and record["reward_funcs"] == {"length_reward:length":
                                                                                sum(lengths) / 4}
    assert record["reward"] == pytest.approx(0.5 * sum(lengths) / 4) and record["reward"] > 0
    assert [g["reward"] for g in record["generations"]] == [0.5 * n for n in lengths]
    before = next(line for line in stdout.splitlines() if "held-out exact-match accuracy before RL" in line)
    assert f"reward {record['reward']:.3f} (reward_funcs: length_reward:length)" in before
