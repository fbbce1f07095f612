"""Sample monitoring during training: every `sample_every_n_steps` optimizer steps, on the main process only,
generate completions for a few fixed held-out prompts, score them, show them, and log `eval/reward`. With
sharded weights (FSDP, ZeRO-3) every process takes part (the embedded backend generates in lockstep; the OpenAI
one gathers the weights for its push), and the main process alone scores and shows.

`on_step_end` runs once per optimizer step, after `global_step` has advanced: never once per micro-batch (the
seed review's bug 1). A backend failure (server down, timeout) is logged and skipped, never fatal.
"""

from __future__ import annotations

import json
import logging

from rich.console import Console
from rich.panel import Panel
from transformers import TrainerCallback

from vftrain.rewards import function_means, resolve_rewards, reward_columns, score
from vftrain.sampling import ChatPrompt, prompt_and_reference

log = logging.getLogger("vftrain")


class SampleCallback(TrainerCallback):
    """Generates, scores and shows samples; `backend(prompts) -> completions` is embedded or OpenAI-compatible.

    `rewards` / `weights`: RL's reward functions and weights, so that `eval/reward` is the reward training
    maximises; by default `args.reward_funcs`, and `eval/reward` is their mean."""

    def __init__(self, trainer, rows: list[dict], backend, console: Console | None = None, rewards: dict | None = None,
                 weights: list[float] | None = None):
        self.trainer = trainer
        self.pairs = [prompt_and_reference(r) for r in rows]
        self.columns = [reward_columns(r) for r in rows]
        self.backend = backend
        self.rewards = resolve_rewards(trainer.args.reward_funcs) if rewards is None else rewards
        n = len(self.rewards)
        self.weights = weights if weights is not None else [1 / max(n, 1)] * n  # SFT: the functions' mean
        for reward in self.rewards.values():
            reward.check_columns(set().union(*self.columns))
        self.console = console or Console()
        self.history: list[dict] = []  # one record per sample, for the reporting integrations' tables

    def on_step_end(self, args, state, control, **kwargs):
        every = args.sample_every_n_steps
        if every and state.global_step % every == 0 and (state.is_world_process_zero or self.trainer.sharded):
            self.sample(state.global_step, main=state.is_world_process_zero)

    def sample(self, step: int, main: bool = True) -> dict | None:
        """One sampling round; `main=False`: another process's part when the weights are sharded (it generates in
        lockstep, or helps gather the weights for a push), without scoring or showing."""
        prompts = [p for p, _ in self.pairs]
        try:
            if not main:
                getattr(self.backend, "participate", self.backend)(prompts, step)
                return None
            completions = self.backend(prompts, step)
        except Exception as exc:  # sampling is monitoring: it must never end a training run
            log.warning("sampling at step %d skipped: %s", step, str(exc).splitlines()[0] if str(exc) else exc)
            return None
        metrics = self._score(completions)
        self._show(step, completions)
        # Trainer.log clears control.should_log; the step's own loss log, due right after this callback, must
        # still happen.
        should_log = self.trainer.control.should_log
        self.trainer.log(dict(metrics))
        self.trainer.control.should_log = should_log
        return metrics

    def _score(self, completions: list[str]) -> dict:
        if not self.rewards:
            return {}
        prompts = [p.messages if isinstance(p, ChatPrompt) else p for p, _ in self.pairs]
        tokenizer = self.trainer.processing_class
        total, per_func = score(self.rewards, self.weights, list(completions), [ref for _, ref in self.pairs],
                                prompts=prompts, rows=self.columns, trainer_state=self.trainer.state,
                                completion_ids=[tokenizer.encode(c, add_special_tokens=False) for c in completions])
        metrics = {f"eval/reward/{name}": mean for name, mean in function_means(per_func).items()}
        return {**metrics, "eval/reward": float(total.mean())}

    def _show(self, step: int, completions: list[str]) -> None:
        for (prompt, reference), completion in zip(self.pairs, completions):
            text = _prompt_text(prompt)
            self.history.append({"step": step, "prompt": text, "completion": completion, "reference": reference})
            cut = " [bold yellow](truncated: max_new_tokens)[/]" if getattr(completion, "truncated", False) else ""
            body = (f"[bold]prompt[/] {text}\n[bold green]completion[/] {completion}{cut}\n"
                    f"[bold]reference[/] {reference}")
            self.console.print(Panel(body, title=f"sample, step {step}", expand=False))
        _log_table(self.trainer.args.report_to, self.history)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    tools = f"tools: {', '.join(_tool_name(t) for t in prompt.tools)}\n" if prompt.tools else ""
    return tools + "\n".join(f"{m.get('role')}: {_content(m)}" for m in prompt.messages)


def _content(message: dict) -> str:
    """A message's text, or its tool calls (a tool turn before the sampled answer) when it has none."""
    content = message.get("content")
    return str(content) if content or not message.get("tool_calls") else json.dumps(message["tool_calls"])


def _tool_name(tool) -> str:
    fn = tool.get("function", tool) if isinstance(tool, dict) else {}
    return str(fn.get("name", "?")) if isinstance(fn, dict) else "?"


def _log_table(report_to, history: list[dict]) -> None:
    if "wandb" in (report_to or []):
        import wandb

        if wandb.run is not None:
            columns = ["step", "prompt", "completion", "reference"]
            wandb.log({"samples": wandb.Table(columns=columns, data=[[h[c] for c in columns] for h in history])})


def embedded_backend(trainer):
    """The model being trained generates (eval mode, no grad, back to train mode; LoRA adapters active)."""
    from vftrain.sampling.embedded import generate

    def run(prompts, step):
        args = trainer.args
        model = trainer.accelerator.unwrap_model(trainer.model)
        # RL samples its rollouts at args.temperature but shows greedy held-out samples (sample_temperature 0)
        temperature = getattr(trainer, "sample_temperature", args.temperature)
        return generate(model, trainer.processing_class, prompts, args.max_new_tokens, temperature, args.top_p,
                        synced=trainer.sharded)

    return run
