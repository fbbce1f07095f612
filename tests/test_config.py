"""SFTConfig: gradient accumulation from the launch's world size (before TrainingArguments uses it), defaults
that work offline, documented fields, bad values named, resolved config written."""

from __future__ import annotations

import dataclasses
import json

import re
import sys

import pytest
import torch

import vftrain as vf
from conftest import TINY, addition_rows
from vftrain.config import TrainerConfig
from vftrain.errors import ConfigError


@pytest.mark.parametrize("world,batch,micro,steps", [(1, 64, 8, 8), (1, 512, 8, 64), (4, 512, 8, 16), (2, 8, 4, 1)])
def test_gradient_accumulation_from_world_size(monkeypatch, tmp_path, world, batch, micro, steps):
    import vftrain.config as config_module

    cfg = vf.SFTConfig(output_dir=str(tmp_path), batch_size=batch, micro_batch_size=micro)
    # The launcher's WORLD_SIZE, as read before TrainingArguments sets anything up (a real multi-process group
    # is exercised in test_distributed.py).
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert config_module.launch_world_size() == world
    cfg.gradient_accumulation_steps = None
    cfg._validate_batch()
    assert cfg.gradient_accumulation_steps == steps and cfg.per_device_train_batch_size == micro
    if world > 1:
        cfg.gradient_accumulation_steps, cfg.batch_size = None, micro * world + micro
        with pytest.raises(ConfigError, match=f"world_size \\({world}\\)"):
            cfg._validate_batch()


def test_accumulation_is_set_before_training_arguments_init(tmp_path, monkeypatch):
    seen = {}
    original = vf.SFTConfig.__mro__[2].__post_init__  # transformers.TrainingArguments.__post_init__

    def spy(self):
        seen["ga"], seen["per_device"] = self.gradient_accumulation_steps, self.per_device_train_batch_size
        original(self)

    monkeypatch.setattr(vf.SFTConfig.__mro__[2], "__post_init__", spy)
    cfg = vf.SFTConfig(output_dir=str(tmp_path), batch_size=512, micro_batch_size=8)
    assert seen == {"ga": 64, "per_device": 8} and cfg.gradient_accumulation_steps == 64


def test_indivisible_batch_names_the_three_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"batch_size = 100 is not divisible by micro_batch_size \(8\) x "
                                          r"world_size \(1\)"):
        vf.SFTConfig(output_dir=str(tmp_path), batch_size=100, micro_batch_size=8)


def test_explicit_accumulation_must_agree(tmp_path):
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 3 disagrees"):
        vf.SFTConfig(output_dir=str(tmp_path), batch_size=64, micro_batch_size=8, gradient_accumulation_steps=3)
    assert vf.SFTConfig(output_dir=str(tmp_path), batch_size=64, micro_batch_size=8,
                        gradient_accumulation_steps=8).gradient_accumulation_steps == 8


def test_explicit_per_device_batch_size_must_agree(tmp_path):
    """TRL's per_device_train_batch_size was silently replaced by micro_batch_size: a user's 4 became 8 rows."""
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size = 4 disagrees with micro_batch_size \(8\)"
                                          r".*set micro_batch_size = 4"):
        vf.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4)
    assert vf.SFTConfig(output_dir=str(tmp_path), micro_batch_size=4,
                        per_device_train_batch_size=4).per_device_train_batch_size == 4
    assert vf.SFTConfig(output_dir=str(tmp_path), micro_batch_size=4).per_device_train_batch_size == 4


@pytest.mark.parametrize("field,value,message", [
    ("micro_batch_size", 0, "micro_batch_size = 0 must be a positive integer"),
    ("sample_backend", "vllm", "sample_backend = 'vllm' is not allowed; choose one of 'embedded', 'openai'"),
    ("nan_policy", "ignore", "nan_policy = 'ignore' is not allowed"),
    ("dtype", "fp8", "dtype = 'fp8' is not allowed"),
    ("sample_every_n_steps", -1, "sample_every_n_steps = -1 is not allowed; expected an integer >= 0 (0: never)"),
])
def test_bad_values_are_named(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        vf.SFTConfig(output_dir=str(tmp_path), **{field: value})


@pytest.mark.parametrize("field,value,allowed", [
    ("learning_rate", -1.0, "a number >= 0"),
    ("learning_rate", float("nan"), "a number >= 0"),
    ("weight_decay", -0.1, "a number >= 0"),
    ("adam_beta1", 1.0, "a number in [0, 1)"),
    ("adam_beta2", -0.1, "a number in [0, 1)"),
    ("adam_epsilon", 0.0, "a number > 0"),
    ("max_grad_norm", -1.0, "a number >= 0 (0: no clipping)"),
    ("max_grad_norm", float("inf"), "a number >= 0"),
    ("warmup_steps", -1, "0, an integer number of steps >= 1, or a fraction in (0, 1)"),
    ("warmup_steps", 1.5, "0, an integer number of steps >= 1, or a fraction in (0, 1)"),
    ("logging_steps", 0, "an integer number of steps >= 1, or a fraction in (0, 1)"),
    ("logging_steps", 2.5, "an integer number of steps >= 1"),
    ("save_steps", -5, "an integer number of steps >= 1"),
    ("eval_steps", 0, "an integer number of steps >= 1"),
    ("max_steps", 0, "a positive integer, or -1 to train num_train_epochs"),
    ("num_train_epochs", 0, "a number > 0"),
    ("save_total_limit", 0, "an integer >= 1 (unset: keep every checkpoint)"),
    ("seed", -1, "an integer in [0, 2**32)"),
    ("data_seed", 2**32, "an integer in [0, 2**32)"),
    ("dataloader_num_workers", -1, "an integer >= 0"),
    ("lora_alpha", 0, "a number > 0"),
    ("lora_dropout", 1.0, "a number in [0, 1)"),
    ("temperature", -0.5, "a number >= 0 (0: greedy)"),
    ("top_p", 0, "a number in (0, 1]"),
    ("sample_timeout", 0, "a number of seconds > 0"),
    ("dataset_num_proc", 0, "an integer >= 1"),
    ("eval_generation_rows", -1, "an integer >= 0 (0: skip)"),
])
def test_out_of_range_values_are_named(tmp_path, field, value, allowed):
    """Refused with the key, the value and what is allowed, before torch or transformers reject them with a
    traceback (learning_rate in Adam) or silently misread them (a negative max_grad_norm turns clipping off)."""
    with pytest.raises(ConfigError) as info:
        vf.SFTConfig(output_dir=str(tmp_path), **{field: value})
    assert str(info.value).startswith(f"{field} = {value!r} is not allowed; expected {allowed}")


@pytest.mark.parametrize("field", ["lr_scheduler_type", "optim", "eval_strategy", "save_strategy",
                                   "logging_strategy", "report_to"])
def test_unknown_names_are_named_with_the_choices(tmp_path, field):
    with pytest.raises(ConfigError, match=rf"^{field} = 'bogus'.* choose (one of|from) .*'(cosine|adamw_torch|steps|wandb)'"):
        vf.SFTConfig(output_dir=str(tmp_path), **{field: "bogus"})


def test_label_smoothing_is_refused_not_ignored(tmp_path):
    """transformers smooths labels in the compute_loss that vftrain replaces: a set value would silently do nothing."""
    with pytest.raises(ConfigError, match=r"label_smoothing_factor = 0.1 is not supported .*; leave it 0"):
        vf.SFTConfig(output_dir=str(tmp_path), label_smoothing_factor=0.1)


@pytest.mark.parametrize("field,value", [("warmup_steps", 0), ("warmup_steps", 0.1), ("warmup_steps", 100),
                                         ("logging_steps", 0.25), ("max_grad_norm", 0.0), ("max_steps", -1),
                                         ("lr_scheduler_type", "constant"), ("report_to", ["all"]),
                                         ("learning_rate", 0.0), ("temperature", 0.7)])
def test_allowed_edge_values_pass(tmp_path, field, value):
    vf.SFTConfig(output_dir=str(tmp_path), **{field: value})


def test_defaults_work_offline(monkeypatch):
    monkeypatch.chdir("/tmp")
    cfg = vf.SFTConfig()
    assert cfg.output_dir == f"outputs/{cfg.run_name}" and cfg.run_name.startswith("sft-")
    assert "None" not in cfg.output_dir
    assert cfg.report_to in ([], "none", ["none"])  # no reporting service unless asked
    assert cfg.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())  # bf16 where the GPU has it
    assert cfg.trust_remote_code is False and cfg.lora_target_modules == "all-linear"
    assert vf.SFTConfig(run_name="exp").output_dir == "outputs/exp"


def test_eval_split_turns_on_eval_loss_unless_told_no(tmp_path):
    """Held-out rows turn the eval loss on; an explicit eval_strategy = 'no' (only eval_generation_rows wanted) was
    replaced by 'steps' as well, and every step ran an eval pass."""
    def strategy(**kw) -> str:
        return str(vf.SFTConfig(output_dir=str(tmp_path), **kw).eval_strategy.value)

    assert strategy(eval_split="test") == strategy(eval_size=8) == "steps" and strategy() == "no"
    assert strategy(eval_size=8, eval_strategy="no") == "no" and strategy(eval_size=8, eval_strategy="epoch") == "epoch"


@pytest.mark.parametrize("optim,module,message", [
    ("adamw_8bit", "bitsandbytes", "You need to install `bitsandbytes` in order to use bitsandbytes optimizers: "
                                   "`pip install -U bitsandbytes`"),
    ("paged_lion_8bit", "bitsandbytes", "You need to install `bitsandbytes`"),
    ("schedule_free_adamw", "schedulefree", "pip install schedulefree"),
    ("galore_adamw", "galore_torch", "You need to install `galore_torch`"),
    ("adamw_torch_8bit", "torchao", "torchao"),
    ("grokadamw", "grokadamw", "Please install grokadamw with `pip install grokadamw`")])
def test_an_optim_whose_package_is_missing_names_it(tmp_path, optim, module, message):
    """transformers looks for the package only when it builds the optimizer (an ImportError traceback after the
    model and data are loaded); its own lookup runs at config time, its message in one line."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    with pytest.raises(ConfigError, match=rf"^optim = '{optim}': [^\n]*{re.escape(message)}"):
        vf.SFTConfig(output_dir=str(tmp_path), optim=optim)


def test_optims_that_need_the_model_pass_the_config_check(tmp_path, monkeypatch):
    """GaLore's lookup asks for the model last: with its package there and optim_target_modules set, the config is
    fine; without optim_target_modules it is refused now rather than after loading."""
    import types

    lookup = pytest.importorskip("transformers.trainer_optimizer")  # transformers >= 5.2x; the GPU's 5.17 differs
    monkeypatch.setattr(lookup, "is_galore_torch_available", lambda: True)
    monkeypatch.setitem(sys.modules, "galore_torch", types.SimpleNamespace(GaLoreAdamW=object, GaLoreAdamW8bit=object,
                                                                           GaLoreAdafactor=object))
    vf.SFTConfig(output_dir=str(tmp_path), optim="galore_adamw", optim_target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="^optim = 'galore_adamw': You need to define `optim_target_modules`"):
        vf.SFTConfig(output_dir=str(tmp_path), optim="galore_adamw")


def test_rl_refuses_an_eval_strategy(tmp_path):
    """RL computes no eval loss: transformers would refuse the missing eval set in Trainer.__init__."""
    with pytest.raises(ConfigError, match="^eval_strategy = 'steps' is not supported by RL"):
        vf.RLConfig(output_dir=str(tmp_path), eval_strategy="steps")


@pytest.mark.parametrize("given, expected", [("q_proj", ["q_proj"]), ("self_attn.q_proj", ["self_attn.q_proj"]),
                                             ("all-linear", "all-linear"), (r".*\.(q|v)_proj", r".*\.(q|v)_proj")])
def test_one_plain_target_module_name_means_that_module(tmp_path, given, expected):
    """peft reads a string as a regular expression over whole dotted names ('q_proj' would match nothing); a plain
    name is read as the one-name list it means, other strings are left to peft."""
    assert vf.SFTConfig(output_dir=str(tmp_path), lora_target_modules=given).lora_target_modules == expected


@pytest.mark.parametrize("given, expected", [(None, True), ({}, True), ({"non_blocking": False}, False),
                                             ({"even_batches": True}, True)])
def test_batches_are_copied_to_the_gpu_without_waiting_unless_told(tmp_path, given, expected):
    """A blocking copy of each micro-batch waits for all queued GPU work (5 syncs per step, ~8% of a 0.5B step's
    time on an H200: benchmarks/RESULTS.md); the user's own accelerator_config still wins."""
    cfg = vf.SFTConfig(output_dir=str(tmp_path), accelerator_config=given)
    assert cfg.accelerator_config.non_blocking is expected
    assert cfg.dataloader_pin_memory  # non-blocking copies need pinned memory to overlap


def test_every_vftrain_field_has_help():
    fields = [f for f in dataclasses.fields(vf.SFTConfig) if f.metadata.get("vftrain")]
    assert len(fields) > 40
    for f in fields:
        assert len(f.metadata["help"]) > 10, f.name


def test_resolved_config_round_trips(tmp_path):
    cfg = vf.SFTConfig(output_dir=str(tmp_path), run_name="r", lora_rank=4, use_lora=True)
    path = cfg.save_resolved(str(tmp_path), extra={"model": "m", "dataset": "d"})
    data = json.loads(open(path).read())
    assert data["model"] == "m" and data["config"]["lora_rank"] == 4 and data["config"]["run_name"] == "r"
    rebuilt = vf.SFTConfig(**{k: v for k, v in data["config"].items()
                              if k in {f.name for f in dataclasses.fields(vf.SFTConfig) if f.metadata.get("vftrain")}})
    assert rebuilt.lora_rank == 4 and rebuilt.gradient_accumulation_steps == cfg.gradient_accumulation_steps
    # transformers' nested settings are written as tables that load back, not as their repr
    assert data["config"]["accelerator_config"]["non_blocking"] is True
    assert vf.SFTConfig(output_dir=str(tmp_path), accelerator_config=data["config"]["accelerator_config"]) \
        .accelerator_config.non_blocking is True


def test_import_is_lazy():
    import subprocess
    import sys

    code = "import sys, vftrain; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == \
        "False False"


@pytest.mark.parametrize("kwargs, world, message", [
    (dict(fsdp=True, deepspeed={"zero_optimization": {"stage": 3}}), "2", "fsdp and deepspeed are both set"),
    (dict(fsdp=True), "1", "fsdp shards over several processes, but this is one"),
    (dict(dtype="float16", fp16=True), "1", "GradScaler refuses float16 gradients"),
    (dict(deepspeed={"zero_optimization": {"stage": 3}}), "2", "deepspeed runs only on GPUs"),
    (dict(deepspeed={"zero_optimization": {"stage": 3}}, nan_policy="skip"), "2",
     "nan_policy = 'skip' cannot skip a step under deepspeed"),
    (dict(deepspeed={"zero_optimization": {"stage": 3}}, micro_batch_tokens=4096, max_seq_len=2048), "2",
     "micro_batch_tokens is not supported with deepspeed"),
])
def test_sharding_that_cannot_run_is_refused(tmp_path, monkeypatch, kwargs, world, message):
    """Refused before any process group is set up, rather than failing deep inside accelerate or running DDP."""
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, also where a GPU is
    with pytest.raises(ConfigError, match=message):
        vf.SFTConfig(output_dir=str(tmp_path), batch_size=16, micro_batch_size=4, **kwargs)


@pytest.mark.parametrize("mode", ["run_name", "run_name_in_dir"])
def test_default_run_name_is_the_same_on_every_process(tmp_path, mode):
    """torchrun, no run_name (no output_dir, or one given), rank 1 starting a clock second after rank 0: one name
    and one folder for both (the name also names LoRA adapters on a sampling server)."""
    from conftest import run_worker

    proc = run_worker(tmp_path / "names", processes=2, mode=mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [(tmp_path / "names" / f"run_name-{rank}.txt").read_text() for rank in (0, 1)]
    assert names[0] == names[1] and names[0].startswith("sft-")
    assert (mode == "run_name_in_dir") == names[0].endswith("/given")


def test_default_run_name_prefix_is_a_class_attribute(monkeypatch):
    monkeypatch.chdir("/tmp")

    @dataclasses.dataclass
    class RLLike(TrainerConfig):
        run_name_prefix = "rl"  # a ClassVar in TrainerConfig: not a field

    assert RLLike().run_name.startswith("rl-") and vf.SFTConfig().run_name.startswith("sft-")


@pytest.mark.parametrize("resume", ["latest", True])
def test_resume_latest_without_a_named_folder_is_refused(tmp_path, monkeypatch, resume):
    """A generated run name is a new folder every run: 'the newest checkpoint in it' can never exist."""
    import datasets

    from conftest import TINY, addition_rows

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="resume_from_checkpoint = latest needs run_name or output_dir"):
        vf.SFTConfig(resume_from_checkpoint=resume)
    assert vf.SFTConfig(resume_from_checkpoint=resume, run_name="exp").output_dir == "outputs/exp"
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)),
                            args=vf.SFTConfig(max_steps=1, batch_size=8))
    with pytest.raises(ConfigError, match="needs run_name or output_dir"):
        trainer.train(resume_from_checkpoint=resume)


def test_several_gpus_without_a_launcher_train_in_one_process(tmp_path, monkeypatch, caplog):
    """transformers wraps the model in nn.DataParallel when it sees several GPUs in one process (which breaks
    logits_to_keep); vftrain trains on one and says how to use all. The GPUs are faked where transformers counts
    them (TrainingArguments.n_gpu)."""
    import datasets
    import torch
    from transformers import TrainingArguments

    from conftest import TINY, addition_rows, small_config

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 4))
    with caplog.at_level("WARNING", logger="vftrain"):
        cfg = small_config(tmp_path, max_steps=1)
    assert "4 GPUs are visible but this is one process" in caplog.text
    assert "torchrun --nproc_per_node 4" in caplog.text
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)), args=cfg)
    trainer.train()
    assert cfg.n_gpu == 1 and trainer.state.global_step == 1
    assert not isinstance(trainer.model_wrapped, torch.nn.DataParallel)


@pytest.mark.parametrize("given, save_only_model, expected", [
    (None, False, "SHARDED_STATE_DICT"),
    ({"state_dict_type": "FULL_STATE_DICT"}, False, "FULL_STATE_DICT"),
    ('{"fsdp_state_dict_type": "FULL_STATE_DICT"}', False, None),  # transformers strips the fsdp_ prefix itself
    (None, True, None),
    ({"version": 1}, False, None),  # transformers writes FSDP1's model only from a full state dict
])
def test_fsdp_writes_sharded_resume_state_unless_told(given, save_only_model, expected):
    """vftrain's FSDP default: resume state written by every process in parallel (issue #12); an explicit
    state_dict_type wins, and a model-only checkpoint (which transformers refuses with sharded state) keeps
    transformers' default."""
    from vftrain.config import _fsdp_config_with_defaults

    config = _fsdp_config_with_defaults(given, save_only_model)
    assert config.get("state_dict_type") == expected
    assert config["cpu_ram_efficient_loading"] is True


@pytest.mark.parametrize("fields, micro, accumulation", [
    (dict(), 8, 8),  # 64 rows per step in slots of 8
    (dict(micro_batch_tokens=4096), 64, 1),  # one slot, packed into the fewest forwards of at most 4,096 tokens
    (dict(micro_batch_tokens=4096, batch_size=32), 32, 1),
    (dict(micro_batch_tokens=4096, micro_batch_size=4), 4, 16),  # an explicit micro_batch_size is honoured
])
def test_sft_micro_batch_under_a_token_budget(tmp_path, fields, micro, accumulation):
    from vftrain.config_checks import filled_micro_batch

    cfg = vf.SFTConfig(output_dir=str(tmp_path), **fields)
    assert (cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (micro, accumulation)
    assert "micro_batch_size" not in cfg.given_fields or "micro_batch_size" in fields  # config.toml keeps "unset"
    assert filled_micro_batch(True, 4096, 64, 2) == 32  # each process's share on two processes


def test_a_budgeted_batch_that_does_not_split_over_the_processes_names_world_size(tmp_path, monkeypatch):
    """micro_batch_size unset under micro_batch_tokens: each process takes an equal share, so batch_size needs only
    divide by the processes (not by a micro_batch_size the user never set)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^batch_size = 65 is not divisible by world_size \(2\): under "
                                          r"micro_batch_tokens each process packs an equal share of the step; "
                                          r"choose a multiple of 2$"):
        vf.SFTConfig(output_dir=str(tmp_path), batch_size=65, micro_batch_tokens=4096)
    with pytest.raises(ConfigError, match=r"not divisible by micro_batch_size \(4\) x world_size \(2\)"):
        vf.SFTConfig(output_dir=str(tmp_path), batch_size=66, micro_batch_tokens=4096, micro_batch_size=4)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 18, r"batch_size = 18 must be a multiple of rollouts_per_example \(4\)"),
    ("rollouts_per_example", 3, r"must be a multiple of rollouts_per_example \(3\)"),
    ("temperature", 0.0, r"temperature = 0.0 must be > 0"),
    ("num_iterations", 0, r"num_iterations = 0 must be a positive integer"),
    ("batch_size", 32, None),
])
def test_fields_set_after_the_config_was_built_are_checked_and_derived_again(tmp_path, field, value, message):
    """Set after construction (transformers' scripts do), a field was neither checked nor spread to what derives
    from it: batch_size = 18 trained 16 rollouts a step, temperature = 0 failed inside sampling, num_iterations = 0
    divided by zero, batch_size = 32 doubled the micro-batches. The trainer now builds the config again, as if the
    value had been given to RLConfig(...)."""
    import datasets

    from rl_worker import config as rl_config
    from rl_worker import digits

    config = rl_config(str(tmp_path / "rl"), 1)
    setattr(config, field, value)
    build = lambda: vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=config,
                                 reward_funcs=[digits])
    if message:
        with pytest.raises(ConfigError, match=message):
            build()
        return
    args = build().args
    assert (args.batch_size, args.micro_batch_size, args.gradient_accumulation_steps) == (32, 4, 8)


def test_an_output_dir_or_run_name_set_afterwards_is_the_runs(tmp_path):
    """An output_dir set after a config built without one: train(resume_from_checkpoint='latest') refused it
    ("latest needs run_name or output_dir"); a run_name set afterwards left output_dir at the generated name's."""
    import datasets

    rows = datasets.Dataset.from_list(addition_rows(16))
    config = vf.SFTConfig(max_steps=1, batch_size=8, micro_batch_size=8, max_seq_len=64, report_to=[], use_cpu=True)
    generated = config.run_name
    config.output_dir = str(tmp_path / "given")
    trainer = vf.SFTTrainer(model=TINY, train_dataset=rows, args=config)
    assert trainer.args.run_name == generated and trainer.args.output_dir == str(tmp_path / "given")
    trainer.train(resume_from_checkpoint="latest")
    assert (tmp_path / "given" / "metrics.jsonl").exists()
    named = vf.SFTConfig(max_steps=1, batch_size=8, micro_batch_size=8, max_seq_len=64, report_to=[], use_cpu=True)
    named.run_name = "set-later"
    assert vf.SFTTrainer(model=TINY, train_dataset=rows, args=named).args.output_dir == "outputs/set-later"
