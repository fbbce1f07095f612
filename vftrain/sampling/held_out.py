"""Greedy completions for held-out rows after (or before) training, scored as the run scores: exact match for SFT,
the run's reward functions and weights for RL. A mixin of `VFTrainer` (the trainer's model, tokenizer, logging and
output folder)."""

from __future__ import annotations

from vftrain.errors import ConfigError, DataError


class HeldOutGenerations:
    def evaluate_generations(self, rows: list[dict] | None = None, max_new_tokens: int | None = None,
                             save: bool = True) -> dict:
        """Greedy completions for `rows` (raw rows; default: the first `eval_generation_rows` held-out rows, all of
        them when it is 0), scored by exact match against their references: {"accuracy", "n", "examples" (the first
        three), "generations", "path"}. RL also scores them with the run's reward functions and weights, as its
        rollouts are ("reward", its mean; "reward_funcs", each function's mean; the rows read as RL reads them: the
        reference is `answer`, `reference` or the completion), since a custom reward is what the run maximises; SFT
        keeps exact match against the completion. With `save` the main process writes every generation to
        `<output_dir>/held_out-step<N>.json` and logs `eval/held_out_accuracy` (and `eval/held_out_reward`) to
        metrics.jsonl and report_to. With sharded weights every process must call this (they generate in
        lockstep), and so must they before train() when `save` (the first write claims output_dir: `start_run`)."""
        from vftrain.data.load import plain_row
        from vftrain.logging import write_held_out
        from vftrain.rewards import answer_text, exact_match
        from vftrain.sampling import prompt_and_reference
        from vftrain.sampling.embedded import generate

        if rows is None:
            held = getattr(self, "raw_eval", None)
            if held is None:
                raise ConfigError("evaluate_generations() needs held-out rows: set eval_split or eval_size (or "
                                  "pass eval_dataset), or pass rows")
            count = min(self.args.eval_generation_rows or len(held), len(held))
            rows = [plain_row(held[i], held.features) for i in range(count)]
        if save and not self.run_started:
            self.start_run(self.resume_point())
        rewards = self._run_rewards()
        pairs = [_prompt_and_answer(r) if rewards else prompt_and_reference(r) for r in rows]
        self._sharded_before_training()
        model = self.accelerator.unwrap_model(self.model)
        completions = generate(model, self.processing_class, [p for p, _ in pairs],
                               max_new_tokens or self.args.max_new_tokens, synced=self.sharded)
        scores = [exact_match(answer_text(c), ref) for c, (_, ref) in zip(completions, pairs)]
        result = {"accuracy": sum(scores) / max(len(scores), 1), "n": len(scores), "path": None,
                  "examples": [(p, c, ref) for (p, ref), c in zip(pairs[:3], completions[:3])],
                  "generations": [{"prompt": p if isinstance(p, str) else p.messages, "completion": c,
                                   "reference": ref, "exact_match": s}
                                  for (p, ref), c, s in zip(pairs, completions, scores)]}
        if rewards:
            self._score_held_out(result, rewards, rows, pairs, completions)
        if save:
            if self.args.should_save:
                result["path"] = write_held_out(self.args.output_dir, self.state.global_step, result)
            reward = {"eval/held_out_reward": result["reward"]} if rewards else {}
            self.log({"eval/held_out_accuracy": result["accuracy"], **reward, "eval/held_out_rows": result["n"]})
        return result

    def _sharded_before_training(self) -> None:
        """FSDP before train(): the weights are sharded by accelerate's prepare, which the training (or evaluation)
        loop runs; until then only process 0 holds them (cpu_ram_efficient_loading, vftrain's default) and the
        others failed to generate on meta tensors. Prepared here as transformers' evaluation loop prepares them."""
        if self.is_fsdp_enabled and not self.accelerator._models:
            self.model = self.accelerator.prepare(self.model)

    def _run_rewards(self) -> dict | None:
        """RL's reward functions ({name: Reward}); None for SFT, and for an environment's run (its rewards score
        episodes, not single completions)."""
        from vftrain.rewards import Reward

        funcs = getattr(self, "reward_funcs", None)
        return funcs if funcs and all(isinstance(f, Reward) for f in funcs.values()) else None

    def _score_held_out(self, result: dict, rewards: dict, rows, pairs, completions) -> None:
        """Add the run's weighted reward ("reward") and each function's mean ("reward_funcs") to `result`, and
        each generation's reward, scored with the inputs rollouts are scored with (`RLTrainer._scored_rollouts`)."""
        from vftrain.rewards import function_means, reward_columns, score

        encode = self.processing_class.encode
        total, per_func = score(rewards, self.args.reward_weights, list(completions), [ref for _, ref in pairs],
                                prompts=[p if isinstance(p, str) else p.messages for p, _ in pairs],
                                rows=[reward_columns(r) for r in rows], trainer_state=self.state,
                                completion_ids=[encode(c, add_special_tokens=False) for c in completions])
        result["reward"] = float(total.mean()) if len(total) else 0.0
        means = function_means(per_func)
        result["reward_funcs"] = {name: means.get(name) for name in per_func}  # None: it scored no completion
        for generation, value in zip(result["generations"], total):
            generation["reward"] = float(value)


def _prompt_and_answer(row: dict):
    """(prompt, reference) of an RL row as rollouts read it (`rl.rollouts.prompt_and_answer`): a `ChatPrompt` with
    the row's tools, or a string."""
    from vftrain.data.render import parse_tools
    from vftrain.rl.rollouts import prompt_and_answer
    from vftrain.sampling import ChatPrompt

    prompt, reference, tools = prompt_and_answer(row)
    if reference is None:
        raise DataError(f"held-out generations are scored by exact match against a reference column (answer, "
                        f"reference or completion), which these rows lack ({sorted(row)}); set "
                        "eval_generation_rows = 0, or add one")
    return (prompt if isinstance(prompt, str) else ChatPrompt(list(prompt), parse_tools(tools))), reference
