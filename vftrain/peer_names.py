"""Names that users of peer projects bring with them, and what to write instead: for the CLI's TOML keys
(`cli/args.check_keys`) and for keyword arguments of the config classes in Python (`unknown_arguments`), whose
dataclass __init__ would raise a bare TypeError naming neither the field to use nor why."""

from __future__ import annotations

import dataclasses
import difflib

from vftrain.errors import ConfigError

# Names that users of TRL (SFTConfig, GRPOConfig, ModelConfig), prime-rl and verifiers' RLConfig bring with them
# (checked against trl 2026-07, prime-rl-configs 2026-08, verifiers rl/trainer/config.py), each with vftrain's field
# for the same thing, or (None, what to do) where there is none. String similarity alone sent num_generations to
# num_iterations (PPO epochs: following it changes the algorithm), use_vllm to use_lora and use_peft to use_cpu.
FOREIGN = {  # name: (vftrain field or None, whose name it is, what else to know)
    "num_generations": ("rollouts_per_example", "TRL", ""),
    "group_size": ("rollouts_per_example", "prime-rl", ""),
    "num_generations_eval": (None, "TRL", "held-out samples are one greedy completion per prompt"),
    "max_completion_length": ("max_new_tokens", "TRL", ""),
    "max_completion_tokens": ("max_new_tokens", "prime-rl", ""),
    "max_tokens": ("max_new_tokens", "verifiers", ""),
    "max_prompt_length": ("max_prompt_len", "TRL", ""),
    "max_length": ("max_seq_len", "TRL", ""),
    "max_seq_length": ("max_seq_len", "TRL", ""),
    "seq_len": ("max_seq_len", "prime-rl", ""),
    "use_vllm": ("rl_backend", "TRL", "rl_backend = 'openai' samples from a vLLM server at sample_base_url"),
    "vllm_mode": ("rl_backend", "TRL", "'embedded' samples in the training process, 'openai' from a server"),
    "vllm_server_base_url": ("sample_base_url", "TRL", ""),
    "vllm_server_host": ("sample_base_url", "TRL", "one URL such as http://host:8000/v1"),
    "vllm_server_port": ("sample_base_url", "TRL", "one URL such as http://host:8000/v1"),
    "vllm_server_timeout": ("sample_timeout", "TRL", ""),
    "vllm_gpu_memory_utilization": (None, "TRL", "give it to the vLLM server you start"),
    "use_peft": ("use_lora", "TRL", ""),
    "lora_r": ("lora_rank", "TRL", ""),
    "use_rslora": ("lora_use_rslora", "TRL", ""),
    "kl_coef": ("beta", "TRL PPO", "the KL penalty's weight"),
    "kl_beta": ("beta", "", "the KL penalty's weight"),
    "generation_batch_size": (None, "TRL", "every step samples batch_size rollouts, batch_size / "
                              "rollouts_per_example prompts"),
    "steps_per_generation": (None, "TRL", "every optimizer step samples its own rollouts, and num_iterations > 1 "
                             "reuses a batch for several steps"),
    "sampling_args": (None, "verifiers", "set temperature, top_p and max_new_tokens"),
    "top_k": (None, "", "sampling takes temperature and top_p"),
    "min_p": (None, "", "sampling takes temperature and top_p"),
    "repetition_penalty": (None, "", "sampling takes temperature and top_p"),
    "loss_type": (None, "TRL", "the loss is the mean over the optimizer step's trained tokens, TRL's 'dapo' in RL "
                  "and 'nll' in SFT"),
    "importance_sampling_level": (None, "TRL", "ratios are per token"),
    "mask_truncated_completions": (None, "TRL", "truncated rollouts are trained as sampled; truncated_frac is "
                                   "logged"),
    "completion_only_loss": (None, "TRL", "the loss mask is automatic: completions and assistant turns only"),
    "assistant_only_loss": (None, "TRL", "the loss mask is automatic: completions and assistant turns only"),
    "dataset_text_field": (None, "TRL", "a 'text' column is found and trained whole"),
    "padding_free": ("packing", "TRL", "packing keeps attention inside each row"),
    "packing_strategy": ("packing", "TRL", "packing is token-balanced"),
    "chat_template_path": ("chat_template", "TRL", "a file path or a template string"),
    "dataset_train_split": ("dataset_split", "TRL", ""),
    "dataset_test_split": ("eval_split", "TRL", ""),
    "max_tool_calling_iterations": ("max_turns", "TRL", ""),
    "log_completions": ("sample_every_n_steps", "TRL", ""),
    "num_completions_to_print": ("num_samples", "TRL", ""),
    "lr": ("learning_rate", "", ""),
    "warmup_ratio": ("warmup_steps", "", "a value below 1 is a fraction of all steps"),
    "torch_dtype": ("dtype", "transformers", ""),
    "model_init_kwargs": (None, "TRL", "set dtype, attn_implementation and trust_remote_code, or pass a loaded model"),
}


def translation(key: str, names, others: dict, section: str | None = None) -> str | None:
    """What to write instead of the unknown `key`, as the rest of a sentence that starts with it (None: no better idea
    than the closest name). `names`: the fields it was given to; `others`: {owner: its fields} of the other entry
    point; `section`: the CLI table (fields are then written `section.field`), None for Python arguments."""
    whose, given = "", key
    if key in FOREIGN:
        target, whose, note = FOREIGN[key]
        if whose:
            whose = f" ({whose}' name)" if whose.endswith("s") else f" ({whose}'s name)"
        note = f" ({note})" if note else ""
        if target is None:
            return f"{whose} has no vftrain counterpart{note}"
        if target in names:
            return f"{whose}: use {f'{section}.' if section else ''}{target}{note}"
        key = target  # a field of the other entry point only
    for other, other_names in others.items():
        if key in other_names:
            if section:
                return f"{whose} is {other}.{key}, a setting of vf-{other} only"
            return f"{whose} is {key + ', ' if key != given else ''}a field of {other} only"
    return None


def unknown_arguments(config_cls, kwargs: dict, configs: list) -> None:
    """A ConfigError naming each keyword argument of `config_cls(...)` that is not a field, with its translation
    (`configs`: the config classes, for a field of another one)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = [key for key in kwargs if key not in names]
    if not unknown:
        return
    others = {c.__name__: {f.name for f in dataclasses.fields(c)} - names for c in configs
              if not issubclass(config_cls, c)}
    notes = []
    for key in unknown:
        hint = difflib.get_close_matches(key, sorted(names), n=1)
        notes.append(key + (translation(key, names, others) or (f" (did you mean {hint[0]}?)" if hint else "")))
    raise ConfigError(f"{config_cls.__name__}: unknown field{'s' if len(notes) > 1 else ''} " + "; ".join(notes))
