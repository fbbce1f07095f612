"""RLTrainer: GRPO-family RL as a `transformers.Trainer`, on the parts SFT uses (`vftrain.trainer.VFTrainer`).

One optimizer step (`get_batch_samples`, called by the Trainer once per step):
1. the step's prompts (`rollouts.step_prompts`: a function of the step, so a resume takes the same ones), this
   process's share of them;
2. `rollouts_per_example` completions of each, token ids in and out with the sampler's own logprobs (the model
   being trained, or an OpenAI-compatible server after a weight push), from a seed of (run seed, step, process);
3. rewards from `reward_funcs`, advantage = reward - group mean (/ std); with `env` set, steps 1-3 play a verifiers
   environment instead (`rl/environment.py`: its tasks' prompts, tool turns, reward functions);
4. one row per rollout through the SFT packer (token-balanced micro-batches) and collator, and the step's
   completion-token count over all processes: the loss normaliser of SFT, so the update is the same for any
   micro-batch / accumulation / process split.
`compute_loss` then applies `loss.policy_token_loss` over the fused output head at completion positions.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vftrain.config import RLConfig
from vftrain.data.collate import Collator
from vftrain.data.pack import split_step
from vftrain.data.render import stop_token_ids
from vftrain.errors import ConfigError
from vftrain.loss import policy_token_loss, select_trained, token_loss_sum
from vftrain.rewards import load_reward_funcs
from vftrain.rl import rollouts as R
from vftrain.rl.stats import RLStats
from vftrain.sampling.tokens import sample, seed_for
from vftrain.trainer import VFTrainer

log = logging.getLogger("vftrain")

ROLLOUT_CACHE = "vftrain_rollouts.pt"  # a checkpoint's rollouts still to be reused (num_iterations > 1)


class RLTrainer(VFTrainer):
    """RL on prompt rows with reward functions.

    `model`: hub name, local path or loaded model (an SFT run's output). `train_dataset`: a `datasets.Dataset` of
    prompt rows (`prompt` messages or string, or `question`; reference in `answer` / `reference` / `completion`),
    or None to load `args.dataset`. `reward_funcs`: callables `fn(completion, reference) -> float` or config names
    (default `args.reward_funcs`); weighted by `args.reward_weights`. With `args.env` (a verifiers environment) pass
    neither: the environment gives both.
    """

    def __init__(self, model: Any = None, train_dataset: Any = None, args: RLConfig | None = None,
                 reward_funcs: Any = None, processing_class: Any = None, eval_dataset: Any = None, **kwargs):
        args = args if args is not None else RLConfig()
        if not isinstance(args, RLConfig):
            raise ConfigError(f"RLTrainer needs an RLConfig, got {type(args).__name__}")
        model, tokenizer = self._load_model(model, args, processing_class)
        self.env, sample_rows, self.raw_eval = None, [], None
        if args.env:  # prompts and rewards from a verifiers environment (rl/environment.py)
            if train_dataset is not None or reward_funcs is not None:
                raise ConfigError("with env set, prompts and rewards come from the environment: pass no "
                                  "train_dataset or reward_funcs")
            from vftrain.rl.environment import VerifiersEnv

            self.env = VerifiersEnv(args.env, args.env_args, tokenizer, args.max_prompt_len, args.max_turns)
            self.prompts, self.reward_funcs = self.env.prompts, dict.fromkeys(self.env.reward_names)
        else:
            raw_train, raw_eval = self._raw_splits(train_dataset, eval_dataset, args)
            self.reward_funcs = _reward_funcs(reward_funcs if reward_funcs is not None else args.reward_funcs)
            if args.sample_every_n_steps:
                sample_rows, raw_train = _held_out(raw_train, raw_eval, args.num_samples)
            self.prompts = R.PromptSet.build(raw_train, tokenizer, args.max_prompt_len)
        self.prompts_per_step = args.batch_size // args.rollouts_per_example
        if len(self.prompts.ids) < self.prompts_per_step:
            raise ConfigError(f"batch_size = {args.batch_size} needs {self.prompts_per_step} prompts per step "
                              f"(rollouts_per_example = {args.rollouts_per_example}), but only "
                              f"{len(self.prompts.ids)} prompts are usable")
        super().__init__(model=model, args=args, train_dataset=range(1), processing_class=tokenizer,
                         data_collator=lambda x: x, **kwargs)
        self.collator = Collator(tokenizer.pad_token_id, args.packing, args.micro_batch_tokens)
        self.stop_ids = stop_token_ids(tokenizer)
        self.sample_temperature = 0.0  # held-out samples are greedy; rollouts use args.temperature
        self.rollout_cache: dict | None = None
        self.backend = None
        if args.rl_backend == "openai":
            from vftrain.sampling.openai_backend import OpenAIBackend

            self.backend = OpenAIBackend(self)
        self.reference = self._reference_model() if args.beta else None
        self._setup_run(RLStats(kl=args.beta > 0), [f"train data: {line}" for line in
                                                     self.prompts.lines() + self._held_out_lines(len(sample_rows))])
        if sample_rows:
            from vftrain.sampling import make_backend
            from vftrain.sampling.callback import SampleCallback

            self.add_callback(SampleCallback(self, sample_rows, make_backend(self)))

    def _reference_model(self):
        """The frozen starting policy for the KL penalty: the base model under LoRA (adapters switched off, no
        copy), else a second copy of the model loaded from the same source."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config"):
            return None  # `_reference_logp` switches the adapters off
        if not self.model_source:
            raise ConfigError("beta > 0 needs the reference model: pass the model as a name or path")
        from vftrain.models import get_model_and_tokenizer

        reference, _ = get_model_and_tokenizer(self.model_source, dtype=self.args.dtype,
                                               attn_implementation=self.args.attn_implementation,
                                               trust_remote_code=self.args.trust_remote_code,
                                               tokenizer=self.processing_class)
        return reference.to(self.args.device).eval().requires_grad_(False)

    # ---- data: the Trainer's loop is driven by a loader of placeholders; rollouts are made per step
    def get_train_dataloader(self) -> DataLoader:
        per_epoch = R.steps_per_epoch(len(self.prompts.ids), self.prompts_per_step)
        return DataLoader(range(per_epoch * self.args.gradient_accumulation_steps), batch_size=1)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches (rollouts made, scored and packed here) and its completion-token count summed
        over all processes."""
        taken = 0
        for _ in range(num_batches):
            try:
                next(epoch_iterator)
                taken += 1
            except StopIteration:
                break
        if not taken:
            return [], None
        step = self.state.global_step
        start = step - step % self.args.num_iterations
        if self.rollout_cache is None or self.rollout_cache["step"] != start:
            self.rollout_cache = {"step": start, **self._make_rollouts(start, num_batches)}
        batches = self.rollout_cache["batches"]
        count = torch.tensor(self.rollout_cache["tokens"], device=device)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return list(batches), count

    def _make_rollouts(self, step: int, num_batches: int) -> dict:
        args, clock = self.args, time.perf_counter()
        world, rank = args.world_size, args.process_index
        indices = R.step_prompts(len(self.prompts.ids), self.prompts_per_step, args.seed, step)
        mine = np.array_split(indices, world)[rank]
        sync = 0.0
        if self.backend is not None:  # timed apart from sampling, which would push too
            sync = -time.perf_counter()
            self.backend.push_weights(step, everyone=args.world_size > 1)
            sync += time.perf_counter()
        samples, texts, rewards, per_func, score_seconds = self._scored_rollouts(mine, step)
        advantages = R.group_advantages(rewards, args.rollouts_per_example, args.scale_rewards)
        scored = time.perf_counter()
        rows = R.training_rows(samples, advantages)
        lengths = np.array([len(r[0]) for r in rows])
        groups = split_step(lengths, np.arange(len(rows)), num_batches, packing=args.packing)
        batches = [self.collator([rows[i] for i in g]) for g in groups]
        tokens = int(sum(r[1].sum() for r in rows))
        prompts = [self.prompts.prompts[i] for i in mine for _ in range(args.rollouts_per_example)]
        self._record(step, prompts, texts, samples, rewards, per_func, advantages)
        self.stats.add_timing(generate=scored - clock - sync - score_seconds, score=score_seconds, sync=sync)
        return {"batches": batches, "tokens": tokens}

    def _scored_rollouts(self, mine, step: int):
        """(samples, completion texts, rewards [n], rewards per function, seconds spent scoring) of this process's
        prompts: sampled then scored by `reward_funcs`, or played and scored by the environment."""
        args = self.args
        if self.env is not None:
            out = self.env.rollouts(mine, args.rollouts_per_example,
                                    lambda prompts, n, turn: self._sample_groups(prompts, step, n, turn),
                                    args.max_seq_len, args.max_new_tokens)
            return out["samples"], out["texts"], out["rewards"], out["per_func"], out["score_seconds"]
        samples = self._sample([self.prompts.ids[i] for i in mine], step)
        clock = time.perf_counter()
        texts = self.processing_class.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
        references = [self.prompts.references[i] for i in mine for _ in range(args.rollouts_per_example)]
        rewards, per_func = R.score(texts, references, self.reward_funcs, args.reward_weights)
        return samples, texts, rewards, per_func, time.perf_counter() - clock

    def _sample(self, prompts: list[list[int]], step: int) -> list:
        groups = self._sample_groups(prompts, step, self.args.rollouts_per_example)
        return [s for group in groups for s in group]

    def _sample_groups(self, prompts: list[list[int]], step: int, n: int, turn: int = 0) -> list[list]:
        """`n` Samples of each prompt, from a seed of (run seed, step, process[, turn of a multi-turn rollout])."""
        args = self.args
        seed = seed_for(args.seed, step, args.process_index, *([turn] if turn else []))
        params = dict(n=n, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      stop_ids=self.stop_ids, seed=seed)
        if self.backend is not None:
            return self.backend.sample_tokens(prompts, step=step, **params)
        model = self.accelerator.unwrap_model(self.model)
        return sample(model, prompts, pad_id=self.processing_class.pad_token_id, synced=self.sharded, **params)

    def _record(self, step, prompts, texts, samples, rewards, per_func, advantages) -> None:
        """All processes' rollouts: metrics for the log, and rollouts.jsonl (main process)."""
        from accelerate.utils import gather_object

        local = [(p, t, s, float(r), {k: float(v[i]) for k, v in per_func.items()}, float(a))
                 for i, (p, t, s, r, a) in enumerate(zip(prompts, texts, samples, rewards, advantages))]
        everything = gather_object(local) if self.args.world_size > 1 else local
        rewards = np.array([x[3] for x in everything])
        names = dict.fromkeys(k for x in everything for k in x[4])  # an environment's functions may vary by task
        per_func = {k: np.array([x[4].get(k, 0.0) for x in everything]) for k in names}
        advantages = np.array([x[5] for x in everything])
        samples = [x[2] for x in everything]
        self.stats.add_rollouts(R.rollout_metrics(rewards, per_func, advantages, samples,
                                                  self.args.rollouts_per_example))
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            lines = R.rollout_records(step, [x[0] for x in everything], [x[1] for x in everything], samples,
                                      rewards, per_func, advantages)
            with open(os.path.join(self.args.output_dir, "rollouts.jsonl"), "a") as fh:
                fh.write("\n".join(lines) + "\n")

    # ---- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        labels = inputs.pop("labels")
        where = (inputs.pop("trained_positions"), inputs.pop("trained_flat"))
        values = inputs.pop("token_values")
        values, _ = select_trained(values[:, where[0]], labels, *where)
        sampler_logp, advantages = values[:, 0], values[:, 1]
        ref_logp = self._reference_logp(model, inputs, labels, where) if args.beta else None

        def token_fn(logp, s, e):
            return policy_token_loss(
                logp, sampler_logp[s:e].to(logp.dtype), advantages[s:e].to(logp.dtype), epsilon=args.epsilon,
                epsilon_high=args.epsilon_high, mask_low=args.mask_ratio_low, mask_high=args.mask_ratio_high,
                ref_logp=None if ref_logp is None else ref_logp[s:e].to(logp.dtype), beta=args.beta)

        values, targets, weight, outputs = self.trained_forward(model, inputs, labels, where)
        fused = dict(hidden=values, weight=weight) if weight is not None else dict(logits=values)
        loss_sum, stats = token_loss_sum(token_fn, targets, temperature=args.temperature, **fused)
        if num_items_in_batch is None:  # evaluation: a plain mean
            return loss_sum / max(targets.numel(), 1)
        self.nan_guard.see(loss_sum)
        self._start_throughput(model)
        self.stats.add_tokens(loss_sum, stats, inputs, labels)
        loss = self.step_normaliser(loss_sum, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _reference_logp(self, model, inputs: dict, labels: torch.Tensor, where: tuple) -> torch.Tensor:
        """The trained tokens' logprobs under the frozen starting policy (the KL term's reference), at the rollout
        temperature: one batched forward per micro-batch over the fused head, as the policy's own. Under LoRA the
        reference is the model with its adapters switched off, else the reference copy."""
        if self.reference is None:
            with self.accelerator.unwrap_model(model).disable_adapter():
                values, targets, weight, _ = self.trained_forward(model, inputs, labels, where)
        else:
            values, targets, weight, _ = self.trained_forward(self.reference, inputs, labels, where)
        fused = dict(hidden=values, weight=weight) if weight is not None else dict(logits=values)
        _, stats = token_loss_sum(_no_loss, targets, temperature=self.args.temperature, **fused)
        return stats[:, 0]

    # ---- checkpoints: rollouts still to be reused (num_iterations > 1) travel with the checkpoint
    def _save_extra_state(self, folder: str) -> None:
        cache = self.rollout_cache
        if cache is None or self.args.num_iterations == 1 or self.state.global_step - cache["step"] >= \
                self.args.num_iterations:
            return
        os.makedirs(folder, exist_ok=True)
        torch.save(cache, self._cache_path(folder))

    def _cache_path(self, folder: str) -> str:
        name = ROLLOUT_CACHE if self.args.world_size == 1 else f"rank{self.args.process_index}-{ROLLOUT_CACHE}"
        return os.path.join(folder, name)

    def _load_extra_state(self, folder: str) -> None:
        path = self._cache_path(folder)
        if os.path.exists(path):
            self.rollout_cache = torch.load(path, weights_only=False)


def _no_loss(logp: torch.Tensor, start: int, end: int):
    """A token loss of zero (`token_loss_sum` then only reports each token's logprob)."""
    return torch.zeros_like(logp), logp.new_zeros((len(logp), 0))


def _reward_funcs(spec) -> dict:
    if callable(spec):
        return {getattr(spec, "__name__", "reward"): spec}
    if isinstance(spec, (list, tuple)) and spec and all(callable(f) for f in spec):
        return {getattr(f, "__name__", f"reward{i}"): f for i, f in enumerate(spec)}
    return load_reward_funcs(spec)


def _held_out(raw_train, raw_eval, n: int):
    """(rows shown as greedy samples, rows to train on): as SFT's held_out_samples, for RL rows; the samples become
    {prompt, completion} rows that sample monitoring reads."""
    from vftrain.sampling import held_out_samples

    rows, raw_train = held_out_samples(raw_train, raw_eval, n)
    out = []
    for row in rows:
        prompt, reference, _ = R.prompt_and_answer(row)
        out.append({"prompt": prompt, "completion": reference})
    return out, raw_train
