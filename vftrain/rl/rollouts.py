"""RL data: prompt rows -> token ids, the prompts of each step, rewards, group advantages, training rows.

Pure functions and small containers; the trainer (`rl/trainer.py`) calls them in order each step:
`PromptSet.build` (once) -> `step_prompts` -> sampling (`vftrain.sampling`) -> `rewards.score` -> `group_advantages` ->
`training_rows`, whose rows go through the SFT packer and collator (`data/pack.py`, `data/collate.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np

from vftrain.data.pack import epoch_order
from vftrain.data.load import plain_row
from vftrain.data.render import RowError, lost_characters, parse_tools, render_prompt
from vftrain.errors import DataError
from vftrain.rewards import function_means, reward_columns
from vftrain.sampling.tokens import Sample

log = logging.getLogger("vftrain")

PROMPT_COLUMNS = ("prompt", "question")
REFERENCE_COLUMNS = ("answer", "reference", "completion")


def prompt_and_answer(row: dict):
    """(prompt: messages or string, reference answer: str, tools) of an RL row. The prompt is `prompt` (messages or
    a string) or `question` (a string, asked as a user message, after a `system_prompt` column's system message);
    the reference is `answer`, `reference`, or the last assistant message of `completion` (so an SFT dataset serves
    RL as is), or None without one (TRL-shaped reward functions read their own columns: `need_references`)."""
    prompt = next((row[c] for c in PROMPT_COLUMNS if row.get(c) is not None), None)
    if prompt is None:
        raise DataError(f"RL rows need a prompt column ({' or '.join(PROMPT_COLUMNS)}); got {sorted(row)}")
    if "prompt" not in row or row.get("prompt") is None:
        system = [{"role": "system", "content": row["system_prompt"]}] if row.get("system_prompt") else []
        prompt = [*system, {"role": "user", "content": prompt}]
    reference = next((row[c] for c in REFERENCE_COLUMNS if row.get(c) is not None), None)
    if isinstance(reference, list):  # completion messages: the last assistant turn
        answers = [m for m in reference if isinstance(m, dict) and m.get("role") == "assistant"]
        reference = answers[-1].get("content") if answers else None
    return prompt, None if reference is None else str(reference), row.get("tools")


def need_references(prompts: "PromptSet", funcs: dict, columns: list[str]) -> None:
    """A DataError where rows lack a reference that a `fn(completion, reference)` function (exact_match too) needs."""
    pairs = [name for name, reward in funcs.items() if not reward.batched]
    if pairs and any(r is None for r in prompts.references):
        raise DataError(f"RL rows need a reference column ({' or '.join(REFERENCE_COLUMNS)}) for the reward "
                        f"functions {', '.join(pairs)}; got {sorted(columns)} (a TRL-shaped function, "
                        "fn(completions, **columns), reads its own columns)")


@dataclasses.dataclass
class PromptSet:
    """The training prompts as token ids (rendered once with the chat template and generation prompt, exactly what
    the sampler continues), their reference answers, and what was dropped."""

    ids: list[list[int]]
    references: list[str]
    prompts: list  # the raw prompts, for rollouts.jsonl
    dropped: dict  # reason -> count
    kept: list[int] = dataclasses.field(default_factory=list)  # positions of the source prompts kept
    columns: list[dict] = dataclasses.field(default_factory=list)  # the rows' other columns (TRL-shaped rewards)

    @classmethod
    def build(cls, dataset, tokenizer, max_prompt_len: int) -> "PromptSet":
        features = getattr(dataset, "features", None)
        rows = [plain_row(dataset[i], features) if features else dataset[i] for i in range(len(dataset))]
        items = (prompt_and_answer(row) for row in rows)
        out = cls.from_prompts(((p, r, parse_tools(t)) for p, r, t in items), tokenizer, max_prompt_len)
        out.columns = [reward_columns(rows[i]) for i in out.kept]
        return out

    @classmethod
    def from_prompts(cls, items, tokenizer, max_prompt_len: int) -> "PromptSet":
        """From (prompt, reference, tools) items; `kept` lists the positions of the items kept."""
        out, dropped, lost = cls([], [], [], {}), {}, []
        for i, (prompt, reference, tools) in enumerate(items):
            try:
                tokens = render_prompt(tokenizer, prompt, tools)
            except RowError as exc:
                dropped[str(exc)] = dropped.get(str(exc), 0) + 1
                continue
            if len(tokens) > max_prompt_len:
                reason = f"prompt longer than max_prompt_len ({max_prompt_len})"
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            chars = lost_characters(tokenizer, tokens, [{"content": prompt}] if isinstance(prompt, str) else prompt)
            if chars:
                lost.append((i, chars))
            out.ids.append(tokens)
            out.references.append(reference)
            out.prompts.append(prompt)
            out.kept.append(i)
        if not out.ids:
            raise DataError("no prompt is left to train on: " + "; ".join(f"{n} {r}" for r, n in dropped.items()))
        plain = sum(isinstance(p, str) for p in out.prompts)
        if plain and getattr(tokenizer, "chat_template", None):
            log.warning("%s prompts are strings: sampled as plain text, without the chat template (as TRL does), "
                        "though this model has one; give a chat model `prompt` as a message list, or the text as "
                        "`question`", f"{plain:,}")
        out.dropped = dropped
        if lost:
            log.warning("%s prompts lose characters that the tokenizer cannot encode: %r (first: prompt %d); the "
                        "model never sees them", f"{len(lost):,}", "".join(sorted({c for _, cs in lost for c in cs})),
                        lost[0][0])
        return out

    def lines(self) -> list[str]:
        out = [f"{len(self.ids):,} prompts; longest {max(len(i) for i in self.ids):,} tokens"]
        out += [f"{n:,} prompts dropped: {reason}" for reason, n in self.dropped.items()]
        return out


def steps_per_epoch(num_prompts: int, prompts_per_step: int) -> int:
    return num_prompts // prompts_per_step


def step_prompts(num_prompts: int, prompts_per_step: int, seed: int, round_: int) -> np.ndarray:
    """Indices of the prompts of rollout round `round_` (all processes; the optimizer step with num_iterations = 1):
    consecutive slices of a per-epoch shuffle. A function of the round alone, so a resumed run takes exactly the
    prompts the original run would have."""
    per_epoch = steps_per_epoch(num_prompts, prompts_per_step)
    epoch, k = divmod(round_, per_epoch)
    return epoch_order(num_prompts, seed, epoch)[k * prompts_per_step:(k + 1) * prompts_per_step]


def group_advantages(rewards: np.ndarray, group_size: int, scale: str = "none") -> np.ndarray:
    """Advantage of each rollout: its reward minus its group's mean (the group = the `group_size` consecutive
    rollouts of one prompt), divided by the group's std with scale = "group" (GRPO, Shao et al. 2024; "none" is
    Dr. GRPO's unbiased form, Liu et al. 2025). A group whose rewards are all equal gets exactly 0 everywhere (its
    mean is not exact in floating point: three rewards of 0.1 gave -1.4e-13, and a gradient)."""
    groups = rewards.reshape(-1, group_size)
    advantages = groups - groups.mean(axis=1, keepdims=True)
    if scale == "group":
        advantages = advantages / (groups.std(axis=1, keepdims=True) + 1e-4)  # TRL's epsilon
    return np.where(_flat(groups), 0.0, advantages).reshape(-1)


def _flat(groups: np.ndarray) -> np.ndarray:
    """Whether each group's rewards are all equal (np.std of equal values need not be 0)."""
    return groups.max(axis=1, keepdims=True) == groups.min(axis=1, keepdims=True)


def training_rows(samples: list[Sample], advantages: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """One packed-collator row per rollout: (input_ids, loss_mask, sampler logprob per token, advantage per
    token). Prompt tokens have mask 0; every sampled completion token, the stop token included, has mask 1, and
    an environment's tokens between turns (`Sample.mask` 0) have mask 0. The ids are the sampler's own (no decode
    -> re-encode)."""
    rows = []
    for sample, advantage in zip(samples, advantages):
        p, c = len(sample.prompt_ids), len(sample.completion_ids)
        ids = np.array(sample.prompt_ids + sample.completion_ids, dtype=np.int64)
        sampled = np.ones(c, np.uint8) if sample.mask is None else np.asarray(sample.mask, np.uint8)
        mask = np.concatenate([np.zeros(p, np.uint8), sampled])
        logp = np.concatenate([np.zeros(p), np.asarray(sample.logprobs, dtype=np.float64)])
        adv = np.concatenate([np.zeros(p), np.full(c, advantage, dtype=np.float64)])
        rows.append((ids, mask, logp, adv))
    return rows


def sampled_tokens(sample: Sample) -> int:
    """Tokens the model generated: a multi-turn rollout's completion also holds the environment's (mask 0)."""
    return len(sample.completion_ids) if sample.mask is None else int(sum(sample.mask))


def rollout_metrics(rewards: np.ndarray, per_func: dict, advantages: np.ndarray, samples: list[Sample],
                    group_size: int) -> dict:
    """The step's rollout statistics (all processes' rollouts gathered first)."""
    groups = rewards.reshape(-1, group_size)
    lengths = np.array([sampled_tokens(s) for s in samples])
    out = {"reward": rewards.mean(), "reward_std": rewards.std(),
           "frac_reward_zero_std": float(_flat(groups).mean()),
           "advantage_abs_mean": np.abs(advantages).mean(),
           "completion_len": lengths.mean(), "completion_len_max": int(lengths.max()),
           "truncated_frac": float(np.mean([s.finish_reason == "length" for s in samples]))}
    for name, mean in function_means(per_func).items():  # over the rollouts each function scored
        scored = per_func[name][~np.isnan(per_func[name])]
        out[f"reward/{name}"] = mean
        out[f"pass_rate/{name}"] = float((scored >= 1.0).mean())
    return {k: float(v) for k, v in out.items()}


def rollout_records(step: int, prompts: list, texts: list[str], samples: list[Sample], rewards: np.ndarray,
                    per_func: dict, advantages: np.ndarray, references: list | None = None,
                    policy_step: int | None = None) -> list[str]:
    """rollouts.jsonl lines: every rollout's prompt, completion, reference, rewards and advantage (to see reward
    hacking). `step`: the step metrics.jsonl logs for the update trained on them (the first, num_iterations > 1);
    `policy_step`: the updates the weights that sampled them had had (step - 1 on-policy, less sampled ahead)."""
    lines = []
    references = references or [None] * len(texts)
    for i, (prompt, text, sample) in enumerate(zip(prompts, texts, samples)):
        lines.append(json.dumps({"step": step, "prompt": prompt, "completion": text,
                                 **({"reference": references[i]} if references[i] else {}),
                                 "reward": float(rewards[i]),
                                 "rewards": {k: None if np.isnan(v[i]) else float(v[i])  # None: not scored
                                             for k, v in per_func.items()},
                                 "advantage": float(advantages[i]), "finish_reason": sample.finish_reason,
                                 **({"policy_step": policy_step} if policy_step is not None else {}),
                                 "completion_tokens": sampled_tokens(sample),
                                 **({"environment_tokens": len(sample.completion_ids) - sampled_tokens(sample)}
                                    if sample.mask is not None else {})}))
    return lines
