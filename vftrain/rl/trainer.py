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

import contextlib
import copy
import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vftrain.config import RLConfig
from vftrain.config_checks import trl_arguments
from vftrain.config_given import rebuilt
from vftrain.data.collate import Collator
from vftrain.data.pack import split_step
from vftrain.data.render import stop_token_ids
from vftrain.errors import ConfigError
from vftrain.guards import any_process
from vftrain.lora import adapter_dtype
from vftrain.loss import policy_token_loss, select_trained, token_loss_sum
from vftrain.rewards import resolve_rewards, score
from vftrain.rl import rollouts as R
from vftrain.rl.pipeline import PipelineCallback, RolloutPipeline
from vftrain.rl.stats import RLStats
from vftrain.sampling.tokens import sample, seed_for
from vftrain.trainer import VFTrainer

log = logging.getLogger("vftrain")

REFERENCE_ADAPTER = "kl_reference"  # a trained adapter's frozen copy: the KL reference under LoRA
ROLLOUT_CACHE = "vftrain_rollouts.pt"  # a checkpoint's rollouts still to be reused (num_iterations > 1)
ROLLOUTS_AHEAD = "vftrain_rollouts_ahead.pt"  # a checkpoint's rollouts sampled for later steps (num_batches_ahead)


class RLTrainer(VFTrainer):
    """RL on prompt rows with reward functions.

    `model`: hub name, local path or loaded model (an SFT run's output). `train_dataset`: a `datasets.Dataset` of
    prompt rows (`prompt` messages or string, or `question`; reference in `answer` / `reference` / `completion`),
    or None to load `args.dataset`. `reward_funcs`: callables `fn(completion, reference) -> float` (or TRL's
    `fn(prompts, completions, **kwargs) -> list[float]`: `vftrain.rewards`) or config names (default
    `args.reward_funcs`); weighted by `args.reward_weights`, one weight per function. With `args.env` (a verifiers
    environment) pass neither: the environment gives both.
    """

    # compile_layers unset stays off: rollouts decode with the eager layers, which would then lack liger's kernels
    # (compiled layers replace them), and the RL step has not been measured with them
    layers_compiled_by_default = False

    def __init__(self, model: Any = None, train_dataset: Any = None, args: RLConfig | None = None,
                 reward_funcs: Any = None, processing_class: Any = None, eval_dataset: Any = None, **kwargs):
        args = args if args is not None else RLConfig()
        if not isinstance(args, RLConfig):
            raise ConfigError(f"RLTrainer needs an RLConfig, got {type(args).__name__}")
        args = rebuilt(args)  # with the fields set since it was built
        trl_arguments("RLTrainer", args, kwargs)
        model, tokenizer = self._load_model(model, args, processing_class)
        disable_dropout(model)
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
            if args.sample_every_n_steps:
                sample_rows, raw_train = _held_out(raw_train, raw_eval, args.num_samples)
            self.prompts = R.PromptSet.build(raw_train, tokenizer, args.max_prompt_len)
            self.reward_funcs = _reward_funcs(reward_funcs if reward_funcs is not None else args.reward_funcs,
                                              args.reward_weights, self.prompts.columns)
            R.need_references(self.prompts, self.reward_funcs, raw_train.column_names)
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
        self.pipeline = RolloutPipeline(self._produce_round, self._push_weights, args.num_batches_ahead,
                                        args.num_iterations, any_process(self.accelerator))
        # before the sample callback: held-out samples from the same server wait for the round being sampled
        self.add_callback(PipelineCallback(self.pipeline, bool(sample_rows) and args.sample_backend == "openai"))
        self.reference = self._reference_model() if args.beta else None
        lines = self.prompts.lines() + self._held_out_lines(len(sample_rows))
        self._setup_run(RLStats(args.rollouts_per_example, kl=args.beta > 0), [f"train data: {x}" for x in lines])
        if sample_rows:
            from vftrain.sampling import make_backend
            from vftrain.sampling.callback import SampleCallback

            # scored by the run's own reward functions and weights (1.0 each when unset, as `score` weighs the
            # training reward): eval/reward is the training reward's measure, not the functions' mean
            weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs)
            self.add_callback(SampleCallback(self, sample_rows, make_backend(self), rewards=self.reward_funcs,
                                             weights=weights))

    def _reference_model(self):
        """The KL penalty's reference: the policy as RL starts, frozen (review RL 6: not the model reloaded from
        its `name_or_path`, which an in-memory SFT model or a trained adapter has moved away from). Under LoRA,
        None: `_as_reference` switches a fresh adapter off (it adds nothing yet) or a trained one to its frozen
        copy. Else a frozen copy of the model, with the attention and kernels resolved for the policy."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config"):
            if not self.fresh_adapter:
                copy_adapter(model, REFERENCE_ADAPTER)
            return None
        if any(p.is_meta for p in model.parameters()):
            # An FSDP rank that receives its shards from rank 0 holds no weights to copy: it loads the source.
            from vftrain.models import get_model_and_tokenizer

            reference, _ = get_model_and_tokenizer(
                self.model_source, dtype=self.args.dtype, attn_implementation=model.config._attn_implementation,
                packing=self.args.packing, trust_remote_code=self.args.trust_remote_code,
                use_liger=self.args.use_liger, compile_layers=self.args.compile_layers,
                tokenizer=self.processing_class, device=self.args.device)
        else:
            reference = copy.deepcopy(model)
        reference = reference.to(self.args.device).eval().requires_grad_(False)
        if self.compiled_layers:
            self.compiled_layers.include(reference)
        return reference

    @contextlib.contextmanager
    def _as_reference(self, model):
        """The model whose forward gives the reference logprobs: the frozen copy, or `model` with its adapters off
        or with the starting adapter's copy active (inference mode; the trained adapter is active again after)."""
        if self.reference is not None:
            yield self.reference
            return
        peft_model = self.accelerator.unwrap_model(model)
        if REFERENCE_ADAPTER not in peft_model.peft_config:
            with peft_model.disable_adapter():
                yield model
            return
        active = peft_model.active_adapter
        peft_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield model
        finally:
            peft_model.set_adapter(active)  # also makes the trained adapter's weights require grad again

    def _data_parts(self) -> list[bytes]:
        return [json.dumps([self.prompts.ids, self.prompts.references]).encode()]

    def evaluate(self, *args, **kwargs):
        raise ConfigError("RLTrainer has no eval loss: evaluate_generations() scores greedy completions of the "
                          "held-out rows with the run's reward functions")

    # ---- data: the Trainer's loop is driven by a loader of placeholders; rollouts are made per step
    def get_train_dataloader(self) -> DataLoader:
        # an epoch passes every prompt once; each round of rollouts trains num_iterations steps (as TRL's sampler)
        per_epoch = R.steps_per_epoch(len(self.prompts.ids), self.prompts_per_step) * self.args.num_iterations
        return DataLoader(range(per_epoch * self.args.gradient_accumulation_steps), batch_size=1)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches (rollouts made, scored and packed here) and its completion-token count summed
        over all processes. Rollouts of later steps are requested first (`rl/pipeline.py`), to be sampled while
        this step trains."""
        taken = 0
        for _ in range(num_batches):
            try:
                next(epoch_iterator)
                taken += 1
            except StopIteration:
                break
        if not taken:
            return [], None
        if self.throughput is None:  # the first step's clocks start with its rollouts, not at construction or resume
            self._start_throughput(self.model)
            self.stats.restart_clock()
        args, step = self.args, self.state.global_step
        start = step - step % args.num_iterations
        waited = self.pipeline.advance(step, self.state.max_steps)
        if self.rollout_cache is None or self.rollout_cache["step"] != start:
            self.rollout_cache = {"step": start, **self._make_rollouts(start, step, num_batches)}
        if args.num_batches_ahead:
            self.stats.add_timing(wait=waited)
            # updates between the weights that sampled the rollouts and those they train (min(step, k) + the
            # num_iterations reuse); an old checkpoint's cache has no version: its rollouts' own step
            version = self.rollout_cache.get("version", start)
            self.stats.add_step_value(off_policy_steps=step - version)
        batches = [_on_device(batch, device) for batch in self.rollout_cache["batches"]]
        # filled on the device: torch.tensor(n, device=...) copies from the host and waits for the queued kernels
        count = torch.full((), self.rollout_cache["tokens"], dtype=torch.long, device=device)
        if args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return batches, count

    def _make_rollouts(self, step: int, now: int, num_batches: int) -> dict:
        """Step `step`'s rollouts (sampled by the pipeline, at optimizer step `now` or earlier), advantages, packed
        micro-batches and completion-token count; recorded in the log and rollouts.jsonl."""
        args = self.args
        made = self.pipeline.take(step, now)
        samples, texts, rewards, per_func, score_seconds = made.scored
        advantages = R.group_advantages(rewards, args.rollouts_per_example, args.scale_rewards)
        rows = R.training_rows(samples, advantages)
        lengths = np.array([len(r[0]) for r in rows])
        groups = split_step(lengths, np.arange(len(rows)), num_batches, packing=args.packing)
        batches = [self.collator([rows[i] for i in g]) for g in groups]
        tokens = int(sum(r[1].sum() for r in rows))
        mine = self._my_prompts(step)
        prompts = [self.prompts.prompts[i] for i in mine for _ in range(args.rollouts_per_example)]
        references = [self.prompts.references[i] for i in mine for _ in range(args.rollouts_per_example)]
        self._record(step, made.version, prompts, references, texts, samples, rewards, per_func, advantages)
        # rounds sampled beside training do not count against time/train; the step waited `made.waited` for them
        self.stats.add_timing(generate=made.seconds - score_seconds, score=score_seconds, beside=made.background)
        if args.num_batches_ahead:
            self.stats.add_timing(wait=made.waited)
        return {"batches": batches, "tokens": tokens, "version": made.version}

    def _my_prompts(self, step: int) -> np.ndarray:
        """This process's share of the prompts of step `step`'s round (every num_iterations-th step makes one)."""
        rounds = step // self.args.num_iterations
        indices = R.step_prompts(len(self.prompts.ids), self.prompts_per_step, self.args.seed, rounds)
        return np.array_split(indices, self.args.world_size)[self.args.process_index]

    def _produce_round(self, step: int) -> tuple:
        """The pipeline's `produce`: this process's rollouts of step `step`, sampled by the weights now served."""
        return self._scored_rollouts(self._my_prompts(step), step)

    def _push_weights(self, step: int) -> None:
        """The pipeline's `push`: the server samples from the weights after `step` updates (every process)."""
        if self.backend is not None:
            clock = time.perf_counter()
            self.backend.push_weights(step, everyone=self.args.world_size > 1)
            self.stats.add_timing(sync=time.perf_counter() - clock)

    def _scored_rollouts(self, mine, step: int):
        """(samples, completion texts, rewards [n], rewards per function, seconds spent scoring) of this process's
        prompts: sampled then scored by `reward_funcs`, or played and scored by the environment."""
        args = self.args
        if self.env is not None:
            def most_rows(rows: int) -> int:
                return int(self.accelerator.gather(torch.tensor([rows], device=args.device)).max())

            synced = self.sharded and self.backend is None  # the embedded sampler's forwards gather the weights
            out = self.env.rollouts(mine, args.rollouts_per_example,
                                    lambda prompts, n, turn: self._sample_groups(prompts, step, n, turn),
                                    args.max_seq_len, args.max_new_tokens, most_rows if synced else None)
            return out["samples"], out["texts"], out["rewards"], out["per_func"], out["score_seconds"]
        samples = self._sample([self.prompts.ids[i] for i in mine], step)
        clock = time.perf_counter()
        texts = self.processing_class.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
        repeat = [i for i in mine for _ in range(args.rollouts_per_example)]
        rewards, per_func = score(self.reward_funcs, args.reward_weights, texts,
                                  [self.prompts.references[i] for i in repeat],
                                  prompts=[self.prompts.prompts[i] for i in repeat],
                                  rows=[self.prompts.columns[i] for i in repeat],
                                  completion_ids=[s.completion_ids for s in samples], trainer_state=self.state)
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
        if self.backend is not None:  # the weights pushed last: `step`'s, or earlier ones sampling ahead (pipeline)
            return self.backend.sample_tokens(prompts, step=self.backend.pushed_step, push=False, **params)
        model = self.accelerator.unwrap_model(self.model)
        return sample(model, prompts, pad_id=self.processing_class.pad_token_id, synced=self.sharded, **params)

    def _record(self, step, version, prompts, references, texts, samples, rewards, per_func, advantages) -> None:
        """All processes' rollouts of optimizer step `step` (0-based), sampled by the weights after `version`
        updates: metrics for the log, and rollouts.jsonl (main process) under the step metrics.jsonl logs for their
        update, step + 1."""
        from accelerate.utils import gather_object

        local = [(p, t, s, float(r), {k: float(v[i]) for k, v in per_func.items()}, float(a), ref)
                 for i, (p, t, s, r, a, ref) in enumerate(zip(prompts, texts, samples, rewards, advantages,
                                                               references))]
        everything = gather_object(local) if self.args.world_size > 1 else local
        rewards = np.array([x[3] for x in everything])
        names = dict.fromkeys(k for x in everything for k in x[4])  # an environment's functions may vary by task
        per_func = {k: np.array([x[4].get(k, np.nan) for x in everything]) for k in names}  # NaN: not scored
        advantages = np.array([x[5] for x in everything])
        samples = [x[2] for x in everything]
        self.stats.add_rollouts(rewards, per_func, advantages, samples)
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            path = os.path.join(self.args.output_dir, "rollouts.jsonl")
            lines = R.rollout_records(step + 1, [x[0] for x in everything], [x[1] for x in everything], samples,
                                      rewards, per_func, advantages, [x[6] for x in everything], version)
            with open(path, "a") as fh:
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

        # top_p < 1 (issue 18.1): the policy trained is the truncated distribution the sampler drew from, so `logp`
        # is its logprob on the trainer's own logits (ratio 1 on-policy). A token outside the trainer's nucleus
        # (trainer and sampler logits differ at the boundary) has probability 0 under it: ratio 0, masked by
        # mask_ratio_low like any mismatch too large to correct. The KL term compares untruncated logprobs
        # (`full_logp`, and `_reference_logp`'s): against a truncated reference a token that a drifted policy keeps
        # and the reference drops has an infinite KL, and KL(truncated policy || untruncated reference) is
        # -log(kept mass) > 0 at the start. Logged entropy: the truncated distribution's (`loss._token_chunk`).
        def token_fn(logp, s, e, full_logp=None):
            return policy_token_loss(
                logp, sampler_logp[s:e].to(logp.dtype), advantages[s:e].to(logp.dtype), epsilon=args.epsilon,
                epsilon_high=args.epsilon_high, mask_low=args.mask_ratio_low, mask_high=args.mask_ratio_high,
                ref_logp=None if ref_logp is None else ref_logp[s:e].to(logp.dtype), beta=args.beta,
                kl_logp=full_logp)

        values, targets, weight, outputs = self.trained_forward(model, inputs, labels, where)
        fused = dict(hidden=values, weight=weight) if weight is not None else dict(logits=values)
        loss_sum, stats = token_loss_sum(token_fn, targets, temperature=args.temperature, top_p=args.top_p, **fused)
        if num_items_in_batch is None:  # evaluation: a plain mean
            return loss_sum / max(targets.numel(), 1)
        self.nan_guard.see(loss_sum)
        self.stats.add_tokens(loss_sum, stats, inputs, labels)
        loss = self.step_normaliser(loss_sum, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _reference_logp(self, model, inputs: dict, labels: torch.Tensor, where: tuple) -> torch.Tensor:
        """The trained tokens' logprobs under the frozen starting policy (the KL term's reference), at the rollout
        temperature, untruncated whatever top_p (see `compute_loss`): one batched forward per micro-batch over the
        fused head, as the policy's own."""
        with self._as_reference(model) as reference:
            values, targets, weight, _ = self.trained_forward(reference, inputs, labels, where)
        fused = dict(hidden=values, weight=weight) if weight is not None else dict(logits=values)
        _, stats = token_loss_sum(_no_loss, targets, temperature=self.args.temperature, **fused)
        return stats[:, 0]

    # ---- checkpoints: rollouts still to be reused (num_iterations > 1) and rollouts sampled for later steps
    # (num_batches_ahead, from weights a resumed run no longer has) travel with the checkpoint
    def _save_extra_state(self, folder: str) -> None:
        cache, ahead = self.rollout_cache, self.pipeline.pending()  # waits for the round being sampled
        reused = cache is not None and self.args.num_iterations > 1 and \
            self.state.global_step - cache["step"] < self.args.num_iterations
        for name, value in ((ROLLOUT_CACHE, cache if reused else None), (ROLLOUTS_AHEAD, ahead)):
            if value:
                os.makedirs(folder, exist_ok=True)
                torch.save(value, self._cache_path(folder, name))

    def _cache_path(self, folder: str, name: str) -> str:
        name = name if self.args.world_size == 1 else f"rank{self.args.process_index}-{name}"
        return os.path.join(folder, name)

    def _load_extra_state(self, folder: str) -> None:
        path = self._cache_path(folder, ROLLOUT_CACHE)
        if os.path.exists(path):
            self.rollout_cache = torch.load(path, weights_only=False)
        path = self._cache_path(folder, ROLLOUTS_AHEAD)
        self.pipeline.restore(torch.load(path, weights_only=False) if os.path.exists(path) else [])


def copy_adapter(peft_model, name: str) -> None:
    """Add a frozen copy of `peft_model`'s active adapter under `name` (the active adapter stays as it was), without
    dropout: the copy is added after `disable_dropout`, and its saved lora_dropout would make the reference's
    train-mode forward noise (review: lora_dropout 0.3 gave KL 0.014 with learning rate 0)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    active = peft_model.active_adapter
    reference = copy.deepcopy(peft_model.peft_config[active])
    reference.lora_dropout = 0.0
    # in the policy adapter's dtype: peft's float32 unless the run keeps it in the base's (adapters_in_base_dtype)
    peft_model.add_adapter(name, reference, autocast_adapter_dtype=adapter_dtype(peft_model) == torch.float32)
    set_peft_model_state_dict(peft_model, get_peft_model_state_dict(peft_model, adapter_name=active),
                              adapter_name=name)
    for key, param in peft_model.named_parameters():
        if f".{name}." in key:
            param.requires_grad_(False)


def disable_dropout(model) -> None:
    """Dropout off in the policy, as TRL's `disable_dropout_in_model`: the sampler draws in eval mode (no dropout),
    so a train-mode forward with dropout would make the on-policy ratio noise, not the policy's drift (review RL
    16: lora_dropout 0.1 gave ratios 0.87-1.09 at step 2)."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    for module in dropouts:
        module.p = 0.0
    if dropouts:
        log.info("dropout off in the RL policy (%d dropout layers): rollouts are sampled without it",
                 len(dropouts))


def _on_device(batch: dict, device) -> dict:
    """A micro-batch's tensors on a GPU `device`, copied from pinned memory without waiting (issue 20); elsewhere
    as they are. Left to the Trainer, each CPU tensor would be copied by a blocking copy, which waits for every
    kernel already queued: 8 host syncs per micro-batch, the GPU idle while the host launched the next forward.
    SFT's loader copies the same way (`config._non_blocking_copies`)."""
    if torch.device(device).type != "cuda":
        return batch
    from accelerate.utils import recursively_apply, send_to_device

    return send_to_device(recursively_apply(torch.Tensor.pin_memory, batch), device, non_blocking=True)


def _no_loss(logp: torch.Tensor, start: int, end: int):
    """A token loss of zero (`token_loss_sum` then only reports each token's logprob)."""
    return torch.zeros_like(logp), logp.new_zeros((len(logp), 0))


def _reward_funcs(spec, weights, columns: list[dict]) -> dict:
    """The run's reward functions (callables or config entries, `rewards.resolve_rewards`), checked before any
    sampling: at least one, one weight per function, the columns TRL-shaped ones name present in the rows."""
    funcs = resolve_rewards(spec)
    if not funcs:
        raise ConfigError("reward_funcs is empty: RL needs at least one reward function (a callable, "
                          "'exact_match', 'module:function' or 'path/to/file.py:function')")
    if weights is not None and len(weights) != len(funcs):
        raise ConfigError(f"reward_weights = {list(weights)!r} has {len(weights)} weights for {len(funcs)} reward "
                          f"functions ({', '.join(funcs)}): give one weight per function")
    names = set().union(*columns) if columns else set()
    for reward in funcs.values():
        reward.check_columns(names)
    return funcs


def _held_out(raw_train, raw_eval, n: int):
    """(rows shown as greedy samples, rows to train on): as SFT's held_out_samples, for RL rows; the samples become
    {prompt, completion} rows that sample monitoring reads."""
    from vftrain.sampling import held_out_samples

    rows, raw_train = held_out_samples(raw_train, raw_eval, n)
    out = []
    for row in rows:  # the row's other columns (its tools, what TRL-shaped rewards read) stay
        prompt, reference, _ = R.prompt_and_answer(row)
        out.append({**row, "prompt": prompt, "completion": reference or ""})
    return out, raw_train
