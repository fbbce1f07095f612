"""A TRL script with `import vftrain as vf` in place of `from trl import ...` (an outside audit of 16 such scripts):
TRL's field names in Python, compute_metrics, the data report of an API run, TRL's values of scale_rewards and
use_liger_kernel, a reward model named as TRL names one, and RL rows whose reference only a TRL-shaped function
reads."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest

import vftrain as vf
from conftest import ROOT, TINY, addition_rows, worker_env
from rl_worker import config as rl_config
from vftrain.errors import ConfigError, DataError


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (vf.SFTConfig, {"max_length": 1024}, "SFTConfig: unknown field max_length (TRL's name): use max_seq_len"),
    (vf.RLConfig, {"num_generations": 8}, "RLConfig: unknown field num_generations (TRL's name): use "
                                          "rollouts_per_example"),
    (vf.SFTConfig, {"max_prompt_len": 8}, "SFTConfig: unknown field max_prompt_len is a field of RLConfig only"),
    (vf.SFTConfig, {"learnin_rate": 1e-5}, "SFTConfig: unknown field learnin_rate (did you mean learning_rate?)"),
    (vf.SFTConfig, {"dataset_text_field": "text", "completion_only_loss": True},
     "SFTConfig: unknown fields dataset_text_field (TRL's name) has no vftrain counterpart (a 'text' column is found "
     "and trained whole); completion_only_loss (TRL's name) has no vftrain counterpart"),
])
def test_trl_field_names_in_python_say_what_to_write(tmp_path, cls, kwargs, message):
    """The dataclass __init__ raised `TypeError: ... unexpected keyword argument 'max_length'`; the CLI's TOML
    already named vftrain's field."""
    with pytest.raises(ConfigError) as caught:
        cls(output_dir=str(tmp_path), **kwargs)
    assert str(caught.value).startswith(message)


def test_compute_metrics_is_refused_not_ignored(tmp_path):
    """It was never called: the head runs only on trained positions, so evaluation passes no logits."""
    cfg = vf.SFTConfig(output_dir=str(tmp_path), max_steps=1)
    with pytest.raises(ConfigError, match="^SFTTrainer takes no compute_metrics= .*evaluate_generations"):
        vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)), args=cfg,
                      compute_metrics=lambda eval_pred: {})


def test_trl_values_of_scale_rewards_and_use_liger_kernel(tmp_path):
    assert vf.RLConfig(output_dir=str(tmp_path), scale_rewards=True).scale_rewards == "group"
    assert vf.RLConfig(output_dir=str(tmp_path), scale_rewards=False).scale_rewards == "none"
    # transformers' own flag patches the model class and replaced vftrain's forward (a triton traceback on CPU)
    liger = vf.SFTConfig(output_dir=str(tmp_path), use_liger_kernel=True)
    assert liger.use_liger is True and liger.use_liger_kernel is False


def test_a_reward_model_name_says_reward_models_are_not_supported():
    from vftrain.rewards import resolve_rewards

    with pytest.raises(ConfigError, match="reward models, which TRL takes by name, are not supported"):
        resolve_rewards("Skywork/Skywork-Reward-V2-Llama-3.1-8B")


def accuracy_reward(completions, solution, **kwargs):
    """TRL's accuracy reward shape: the reference is the `solution` column."""
    return [float(c[0]["content"].strip() == s) for c, s in zip(completions, solution)]


def _solution_rows(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"prompt": r["prompt"], "solution": r["completion"][0]["content"]}
                                       for r in addition_rows(n)])


def test_rl_rows_need_a_reference_only_for_functions_that_read_one(tmp_path):
    """prompt + solution rows with a TRL-shaped function were refused: 'RL rows need a reference column'."""
    cfg = rl_config(str(tmp_path / "rl"), 1, save_strategy="no")
    vf.RLTrainer(model=TINY, train_dataset=_solution_rows(16), args=cfg, reward_funcs=[accuracy_reward]).train()
    rollouts = [json.loads(x) for x in (tmp_path / "rl" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 16 and "accuracy_reward" in rollouts[0]["rewards"]
    with pytest.raises(DataError, match="need a reference column .* for the reward functions exact_match; got "
                                        r"\['prompt', 'solution'\]"):
        vf.RLTrainer(model=TINY, train_dataset=_solution_rows(16), args=rl_config(str(tmp_path / "b"), 1),
                     reward_funcs=["exact_match", accuracy_reward])


API_RUN = """
import datasets, vftrain as vf
from conftest import TINY, addition_rows
rows = addition_rows(32)
rows[0] = {**rows[0], "completion": [{"role": "assistant", "content": "9" * 400}]}
config = vf.SFTConfig(output_dir=OUT, max_steps=1, max_seq_len=64, batch_size=8, micro_batch_size=8,
                      disable_tqdm=True)
vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(rows), args=config).train()
"""


def test_an_api_run_prints_its_data_report(tmp_path):
    """Only the CLI set up console logging: a script's dropped rows were reported at INFO to no handler."""
    script = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); OUT = {str(tmp_path / 'out')!r}\n" + API_RUN
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=worker_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 rows dropped: longer than max_seq_len" in proc.stdout
