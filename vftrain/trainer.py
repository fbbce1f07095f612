"""What the SFT and RL trainers share: a `transformers.Trainer` with vftrain's model loading, guards, logging,
master weights (float32 or compensated bf16), fused output head, atomic checkpoints and exports.

`SFTTrainer` (`sft/trainer.py`) and `RLTrainer` (`rl/trainer.py`) subclass `VFTrainer` and add only their data
(rows vs rollouts) and their loss (cross-entropy vs policy gradient); everything a run does around them lives here
once, so SFT -> RL changes the objective and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import torch
from transformers import Trainer, enable_full_determinism, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from vftrain import attention, checkpoint, memory
from vftrain.compile import CompiledLayers
from vftrain.config import TrainerConfig
from vftrain.config_checks import compiles_when_unset, weights_from_rank0
from vftrain.data.load import held_out_lines, raw_splits
from vftrain.errors import ConfigError
from vftrain.guards import GracefulInterrupt, NonFiniteLossGuard, any_process
from vftrain.loss import select_trained
from vftrain.logging import (LogAtSaves, MetricsFileCallback, RichProgressCallback, RunSummaryCallback,
                             console_unless_configured)
from vftrain.lora import adapters_in_base_dtype, continue_or_merge, refuse_attached_adapter
from vftrain.mlp import use_lean_mlp
from vftrain.models import (apply_lora, distinct_meta_pointers, export_merged,
                            get_model_and_tokenizer, head_returns_hidden, is_adapter_folder,
                            keep_gathered_through_backward, layers_compiled, plain_output_head, save_merged)
from vftrain.optim import KAHAN_MODES, CompensatedAdamW, needs_master_weights, use_float32_master_weights
from vftrain.resume import RunFolder
from vftrain.sampling.held_out import HeldOutGenerations
from vftrain.walks import walk

log = logging.getLogger("vftrain")


class VFTrainer(HeldOutGenerations, RunFolder, Trainer):
    """Base of SFTTrainer and RLTrainer. Subclasses load their data, call `super().__init__` with the model from
    `_load_model`, then `_setup_run()`; they implement `compute_loss` and `get_batch_samples`."""

    layers_compiled_by_default = True  # `compile_layers` left unset: on where `compile.compile_applies`

    def _load_model(self, model, args: TrainerConfig, tokenizer, prepare: bool = True):
        """The model to train (loaded, patched, LoRA-wrapped) and its tokenizer. prepare = False stops after
        loading: the subclass calls `_prepare_model` once its data is ready (the memory estimate reads it)."""
        # Seeded before anything random is created here (LoRA's initial weights), as the Trainer seeds only in its
        # own __init__: the same seed then gives the same adapters in every run and on every process (FSDP shards
        # each process's own copy, so differing copies would be stitched together).
        if args.full_determinism:
            enable_full_determinism(args.seed)
        else:
            set_seed(args.seed)
        if model is None:
            raise ConfigError(f"{type(self).__name__} needs a model: a hub name, a local path or a loaded model")
        refuse_attached_adapter(model)
        self.adapter_folder = model if isinstance(model, str) and is_adapter_folder(model) else None
        self.model_source = model if isinstance(model, str) else getattr(model, "name_or_path", None)
        # FSDP with cpu_ram_efficient_loading (vftrain's default): rank 0 reads the weights and sends each process
        # its shards (accelerate's fsdp2_prepare_model), so the others need not hold a copy of the model.
        load_weights = not weights_from_rank0(args) or args.process_index == 0
        compile_layers = args.compile_layers
        self.compile_asked = compile_layers is True
        if compile_layers is None and (not self.layers_compiled_by_default or not compiles_when_unset(args)):
            compile_layers = False
        model, tokenizer = get_model_and_tokenizer(
            model, dtype=args.dtype, attn_implementation=args.attn_implementation, packing=args.packing,
            trust_remote_code=args.trust_remote_code, use_liger=args.use_liger, compile_layers=compile_layers,
            tokenizer=tokenizer, load_weights=load_weights, chat_template=args.chat_template,
            chat_template_kwargs=args.chat_template_kwargs, device=args.device)
        # as the loader decided it (the same rule on the same model); saved with the resolved config
        args.compile_layers = layers_compiled(model, args.device, compile_layers, args.use_liger)
        # The dtype checkpoints are written in: FSDP2 upcasts sharded weights to float32 for its mixed precision.
        self.weights_dtype = next(model.parameters()).dtype
        if args.packing and not attention.keeps_rows_apart(model):
            raise ConfigError(f"packing = true would let packed rows attend to each other: this model's attention "
                              f"({model.config.model_type}) does not read the position_ids that mark where each row "
                              "starts (Bloom, MPT, OPT, gpt-oss, Mamba, ...); set packing = false")
        return (self._prepare_model(model, args) if prepare else model), tokenizer

    def _prepare_model(self, model, args: TrainerConfig):
        """The loaded model made ready to train: the lean paths the memory estimate chooses, the LoRA adapter."""
        self._fit_memory(model, args)
        if args.lean_mlp:
            use_lean_mlp(model)
        # Whether the adapter trained here starts as the identity (the base model's outputs): RL's KL reference is
        # then the model with its adapters off, else a frozen copy of the starting adapter.
        self.fresh_adapter = False
        if self.adapter_folder:
            model = continue_or_merge(model, args.use_lora, self.adapter_folder)
        elif args.use_lora and not hasattr(model, "peft_config"):
            model = apply_lora(model, args)
            # peft's default init (and "gaussian") sets B = 0: the adapted model equals the base until trained.
            self.fresh_adapter = model.peft_config[model.active_adapter].init_lora_weights in (True, "gaussian")
        if args.use_lora and args.master_weights:
            adapters_in_base_dtype(model)
        if args.use_lora and args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        # an explicit compile_layers = true fails loudly where torch.compile does; left unset, it falls back to eager
        self.compiled_layers = CompiledLayers(model, strict=self.compile_asked) if args.compile_layers else None
        return model

    def compiled(self):
        """The decoder layers run compiled inside the block (`compile_layers`); elsewhere they are eager."""
        return self.compiled_layers.active() if self.compiled_layers else contextlib.nullcontext()

    def compute_loss_context_manager(self):
        """transformers' (autocast) with the compiled layers: every training and evaluation forward."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.compiled())
        return stack

    def _fit_memory(self, model, args: TrainerConfig) -> None:
        """lean_mlp and gradient_checkpointing left unset: lean_mlp on in a full-weight run, each on where the run's
        estimated peak would not fit the GPU (in that order), else off; a run that cannot fit stops here, before
        training (vftrain/memory.py). Sharded runs and CPU runs turn them off without an estimate."""
        auto = getattr(args, "memory_auto", ())
        budget = None if args.fsdp or args.deepspeed or not auto else memory.card_bytes(args.device)
        chosen = dict.fromkeys(auto, False)
        if budget is not None:
            kwargs = args.gradient_checkpointing_kwargs or {}
            chosen = memory.fit(model, memory.plan_of(args, model, self._largest_forward(args)), budget, auto,
                                sparse="every_n_layers" not in kwargs)
            if "every_n_layers" in chosen:  # read by transformers when it turns checkpointing on, in train()
                kwargs = {**kwargs, "every_n_layers": chosen.pop("every_n_layers")}
                for name in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):
                    if hasattr(args, name):  # transformers >= 5.2x reads the new name
                        setattr(args, name, kwargs)
        for name, value in chosen.items():
            setattr(args, name, value)
            if name == "gradient_checkpointing" and hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = value  # transformers >= 5.2x reads the new name
        args.memory_auto = ()

    def _largest_forward(self, args: TrainerConfig) -> int | None:
        """Tokens in the run's largest forward where the data decides them before training, else None (the
        estimate then takes the configured bound, `memory.tokens_per_micro_batch`)."""
        return None

    def _raw_splits(self, train_dataset, eval_dataset, args: TrainerConfig):
        """`raw_splits`, with the held-out rows kept as `raw_eval` (`evaluate_generations`)."""
        raw_train, self.raw_eval = raw_splits(train_dataset, eval_dataset, args)
        return raw_train, self.raw_eval

    def _held_out_lines(self, sample_rows: int) -> list[str]:
        return held_out_lines(self.args, self.raw_eval, sample_rows)

    def _setup_run(self, stats, report_lines: list[str]) -> None:
        """After `Trainer.__init__`: engine checks, loss bookkeeping, vftrain's callbacks, the resolved config."""
        console_unless_configured()
        if self.args.fsdp and not self.is_fsdp_enabled:  # accelerate falls back to DDP without a word
            raise ConfigError("fsdp is set but accelerate did not shard the model: it runs FSDP only with one "
                              "process per GPU (torchrun or accelerate launch on GPUs); leave fsdp unset here")
        # compute_loss already normalises over the whole step: the Trainer must not divide again by the number of
        # accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.stats = stats
        self.throughput = None
        for callback in (ProgressCallback, PrinterCallback):
            self.remove_callback(callback)
        self._agree = agree = any_process(self.accelerator)  # the processes take decisions together
        self.nan_guard = NonFiniteLossGuard(self, agree)
        # The NaN guard after the interrupt and LogAtSaves: a stop, save or log they ask for sees the step's flag read.
        self.interrupt = GracefulInterrupt(agree)
        for callback in (RichProgressCallback(), MetricsFileCallback(), RunSummaryCallback(), self.interrupt,
                         LogAtSaves(), self.nan_guard):
            self.add_callback(callback)
        for line in report_lines:
            log.info("%s", line)
        self._warn_beyond_context()
        self.run_started = False

    def _warn_beyond_context(self) -> None:
        """A warning before training when rows may be longer than the model's context: positions past
        max_position_embeddings were never trained (learned position tables fail outright), and servers such as
        vftrain.serve and vLLM refuse such prompts. A warning, not an error: RoPE models run past it and some
        users extend the context on purpose."""
        args = self.args
        if hasattr(args, "max_prompt_len"):  # RL: the longest rollout
            length, what = args.max_prompt_len + args.max_new_tokens, (
                f"max_prompt_len + max_new_tokens = {args.max_prompt_len} + {args.max_new_tokens}")
        else:
            length, what = args.max_seq_len, "max_seq_len"
        config = self.accelerator.unwrap_model(self.model).config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limits = {"max_position_embeddings": getattr(config, "max_position_embeddings", None),
                  "tokenizer model_max_length": getattr(self.processing_class, "model_max_length", None)}
        limits = {k: int(v) for k, v in limits.items() if isinstance(v, int) and 0 < v < 10**9}  # 1e30: unset
        if limits and length > min(limits.values()):
            context = min(limits.values())
            known = ", ".join(f"{k} {v:,}" for k, v in limits.items())
            log.warning("%s = %s is beyond the model's context of %s tokens (%s): longer rows would train "
                        "positions the model was not trained on; lower it to %s unless the context was extended",
                        what, f"{length:,}", f"{context:,}", known, f"{context:,}")

    def evaluate(self, *args, **kwargs):
        """transformers' evaluation (eval loss), which logs to output_dir: before training the folder is claimed first
        (`start_run`, with the config's resume_from_checkpoint), so a later train() continues what it wrote."""
        if not self.run_started:
            self.start_run(self.resume_point())
        return super().evaluate(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._adapters_back_in_base_dtype(model if model is not None else self.model)

    def _load_best_model(self) -> None:
        super()._load_best_model()  # load_best_model_at_end
        self._adapters_back_in_base_dtype(self.model)

    def _adapters_back_in_base_dtype(self, model) -> None:
        # peft's load_adapter (unsharded runs; FSDP loads its own shards) casts the adapters back to float32
        if self.args.use_lora and self.args.master_weights and not self.sharded:
            adapters_in_base_dtype(model)

    def _issue_warnings_after_load(self, load_result) -> None:
        """transformers' check after a resume, without the tied output head: it is saved once, as the embedding,
        and transformers 5 no longer lists it in `_keys_to_ignore_on_save`, so every resume of a tied model said
        "There were missing keys in the checkpoint model loaded: ['lm_head.weight']" (harmless, read as corruption)."""
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or ())
        if tied & set(load_result.missing_keys):
            self.model.tie_weights()
        super()._issue_warnings_after_load(load_result._replace(
            missing_keys=[k for k in load_result.missing_keys if k not in tied]))

    def _save_after_oom(self) -> str | None:
        """Checkpoint of the finished steps, unless there are none, one exists already, or other processes are
        involved (they are stuck in a collective and cannot join a save)."""
        self.nan_guard.resolve(self.args)  # a bad last step raises (stop) here rather than being saved
        step = self.state.global_step
        folder = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        if step and os.path.isdir(folder):
            return folder  # this step is saved already
        if step == 0 or self.args.world_size > 1 or not self.args.should_save:
            return None
        self.model.zero_grad(set_to_none=True)  # the unfinished step's gradients
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            self._save_checkpoint(self.model, trial=None)
        except torch.OutOfMemoryError:
            return None
        return folder

    @property
    def sharded(self) -> bool:
        """Weights are sharded over the processes (FSDP, DeepSpeed): every process must take part in a forward."""
        return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        if fresh and self.sharded:
            distinct_meta_pointers(model if model is not None else self.model)
        optimizer = super().create_optimizer(model)
        # FSDP and DeepSpeed keep float32 master weights themselves.
        if fresh and self.args.master_weights and not self.sharded and needs_master_weights(
                p for group in optimizer.param_groups for p in group["params"]):
            if self.args.fp16:  # fp16 autocast's GradScaler unscales the model's gradients, not the masters'
                mode = "true" if self.args.master_weights is True else repr(self.args.master_weights)
                raise ConfigError(f"fp16 = true with bfloat16 weights and master_weights = {mode} cannot train: "
                                  "the loss scaler never sees the optimizer's own weights (clipping sees scaled "
                                  "gradients, its step fails); use bf16 = true, dtype = 'float32' with fp16 = true, "
                                  "or master_weights = false")
            if self.args.master_weights in KAHAN_MODES:
                if not isinstance(optimizer, torch.optim.AdamW):
                    raise ConfigError(f"master_weights = {self.args.master_weights!r} runs its own AdamW, but optim = "
                                      f"{getattr(self.args.optim, 'value', self.args.optim)!r} is not AdamW; use an adamw_torch optim, or "
                                      "master_weights = true")
                moments = KAHAN_MODES[self.args.master_weights]
                self.optimizer = optimizer = CompensatedAdamW.replacing(optimizer, moments)
            else:
                use_float32_master_weights(optimizer)
        return optimizer

    # ---- one accumulation slot
    def training_step(self, model, inputs, num_items_in_batch=None):
        """One accumulation slot; a slot split by `micro_batch_tokens` runs its parts back to back, syncing
        gradients (DDP) only after the last part, and only when the Trainer would sync the slot. The compiled
        layers (if any) cover the backward too: checkpointed layers recompute their forward there."""
        with self.compiled():
            return self._training_slot(model, inputs, num_items_in_batch)

    def _training_slot(self, model, inputs, num_items_in_batch=None):
        if not self.sharded:  # FSDP and DeepSpeed wrappers keep their own train() / zero_grad()
            walk(model)  # transformers calls model.train() here on every micro-batch: a walk of every module
        parts = inputs.get("micro_batches")
        real, idle = parts or [inputs], 0
        if self.sharded and self.args.micro_batch_tokens:
            # Sharded weights: every process must run every forward (FSDP gathers each layer's weights from all
            # of them), but a token budget splits each process's slot into its own number of forwards; a process
            # with fewer repeats its last one, weighed 0. Before this a 2-process FSDP run hung on its first such
            # slot (tests/test_distributed.py). Agreeing reads the count back: one host sync per slot, sharded runs
            # only.
            idle = self._most_forwards(len(real)) - len(real)
        if parts is None and not idle:
            return super().training_step(model, inputs, num_items_in_batch)
        runs = [(part, False) for part in real] + [(real[-1], True)] * idle
        # A slot the Trainer does not sync already runs inside no_sync; entering it again would turn syncing back
        # on at exit under FSDP2 (accelerate's FSDP2 no_sync does not restore the previous setting).
        sync_slot = self.accelerator.sync_gradients
        loss = 0.0
        for i, (part, repeat) in enumerate(runs):
            defer = sync_slot and i < len(runs) - 1
            with self.accelerator.no_sync(model) if defer else contextlib.nullcontext():
                if repeat:
                    self._idle_forward(model, part, num_items_in_batch)
                else:
                    loss = loss + super().training_step(model, part, num_items_in_batch)
        return loss

    def _most_forwards(self, mine: int) -> int:
        count = torch.tensor([mine], device=self.args.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count.item())

    def _idle_forward(self, model, part: dict, num_items_in_batch) -> None:
        """`part` (already trained in this slot) through the same training step again, so that the sharded
        engine's gathers and reductions match the other processes' (RL's reference forward included), with its
        loss multiplied by 0 and its metrics dropped: it adds zero gradients and nothing to the logs."""
        stats, self.stats = self.stats, _Dropped()
        self.compute_loss = lambda *args, **kwargs: type(self).compute_loss(self, *args, **kwargs) * 0
        try:
            super().training_step(model, part, num_items_in_batch)
        finally:
            self.stats = stats
            del self.compute_loss

    def _clip_grad_norm(self, model):
        """transformers' clipping over the parameters listed once (vftrain/walks.py), not `model.parameters()`."""
        if self.sharded or "_vf_walk" not in vars(model) or self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(walk(model).parameters(), self.args.max_grad_norm)

    def floating_point_ops(self, inputs) -> int:
        """transformers' estimate for `total_flos` (6 x input tokens x non-embedding parameters), with the parameter
        count worked out once: the model's own method walks every module and parameter on every micro-batch (~5 ms
        of host time per step on a 0.5B model, time the GPU then waits for)."""
        if "_flop_params" not in self.__dict__:
            count = getattr(self.model, "num_parameters", None)
            self._flop_params = count(exclude_embeddings=True) if count else 0
        parts = inputs.get("micro_batches") or [inputs]
        return sum(6 * p["input_ids"].numel() * self._flop_params for p in parts if "input_ids" in p)

    def step_normaliser(self, loss_sum: torch.Tensor, num_items_in_batch: torch.Tensor) -> torch.Tensor:
        """`loss_sum` (this micro-batch's summed token losses) as its share of the step's mean over every trained
        token on every process. DDP/FSDP average gradients over processes, hence the factor."""
        return loss_sum / num_items_in_batch.clamp(min=1) * self.accelerator.num_processes

    def _start_throughput(self, model) -> None:
        if self.throughput is None:  # the clock starts at the first micro-batch: start-up is not counted
            from vftrain.metrics import Throughput

            self.throughput = Throughput(self.accelerator.unwrap_model(model))

    def _fused_head(self, model):
        """The output head that the loss applies itself (no logits held), or None to use the model's logits:
        ZeRO-3 and FSDP1 partition the head's weight outside the model's forward. FSDP2 keeps it gathered.
        Worked out once per model object (the Trainer passes the same wrapped model to every micro-batch; RL's
        frozen reference is a second one)."""
        heads = self.__dict__.setdefault("_heads", {})
        if id(model) in heads and heads[id(model)][0] is model:
            return heads[id(model)][1]
        head = None
        if not (self.is_deepspeed_enabled or (self.is_fsdp_enabled and not self.accelerator.is_fsdp2)):
            head = plain_output_head(model)
            if head is not None and self.is_fsdp_enabled:
                keep_gathered_through_backward(model, head)
        heads[id(model)] = (model, head)
        return head

    def trained_forward(self, model, inputs: dict, labels: torch.Tensor, where: tuple):
        """The model's forward, evaluated only at trained positions: (values, targets, head weight, outputs), where
        values are final hidden states [N, hidden] when the loss applies the output head itself (weight is the
        head's; no logits held), else the model's logits [N, vocab] (weight None)."""
        head = self._fused_head(model)
        if head is None:
            outputs = model(**inputs, use_cache=False, logits_to_keep=where[0])
            logits, targets = select_trained(outputs.logits, labels, *where)
            return logits, targets, None, outputs
        with head_returns_hidden(head):
            outputs = model(**inputs, use_cache=False, logits_to_keep=where[0])
        hidden, targets = select_trained(outputs.logits, labels, *where)
        weight = self.head_weight(head)
        # accelerate's mixed precision returns outputs in float32; the head's matmul runs in its own dtype, as it
        # would inside the model.
        return hidden.to(weight.dtype), targets, weight, outputs

    @staticmethod
    def head_weight(head) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        if isinstance(head.weight, DTensor):  # keep_gathered_through_backward failed: never use a shard as the head
            raise RuntimeError("FSDP resharded the output head after the forward; please report this with "
                               "your accelerate and torch versions")
        return head.weight

    # ---- logging and saving
    def log(self, logs: dict, *args, **kwargs) -> None:
        if "train_loss" in logs:  # in place: train() returns these metrics
            logs["train_loss"] = self._whole_run_loss(logs["train_loss"])
        if "loss" in logs:
            metrics, attn_sq = self.stats.pop(self._reduce_stats)
            logs.update(metrics)
            if self.throughput is not None:
                self.throughput.update(logs, attn_sq)
        super().log(logs, *args, **kwargs)

    def _reduce_stats(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.args.world_size == 1:
            return tensor
        if op == "sum":
            return self.accelerator.reduce(tensor, reduction="sum")
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op.upper()))
        return tensor

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if self.is_fsdp_enabled and self.accelerator.is_fsdp2:
            # transformers writes no model under SHARDED_STATE_DICT (vftrain's FSDP default: the resume state is
            # written sharded beside it), and under FULL gathers float32 copies through the CPU; gathered here in the
            # model's own dtype on the GPUs, so a checkpoint always holds a folder from_pretrained loads.
            state_dict = checkpoint.gathered_state_dict(self.model, self._saved_dtype(), self.args.should_save)
            if self.args.should_save:
                self._save(output_dir, state_dict=state_dict)
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        else:
            super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.save_resolved_config(output_dir or self.args.output_dir)
        # Sharded weights: the other processes only helped gather them. Held here until the main process has
        # written the folder, so that a script that exits after saving does not tear down the process group under
        # it (most likely what happened on the 7B benchmark: rank 1 died with SIGSEGV while rank 0 was writing).
        if self.sharded:
            self.accelerator.wait_for_everyone()

    def _saved_dtype(self) -> torch.dtype | None:
        """The dtype FSDP checkpoints are written in: the model's own, not FSDP's float32 copies (None: keep). A
        peft model saves its adapters, which keep the dtype they train in (LoRA: float32, as one process saves
        them; the sharded merge_lora merges from these)."""
        if not self.is_fsdp_enabled or self.weights_dtype == torch.float32:
            return None
        return None if hasattr(self.accelerator.unwrap_model(self.model), "peft_config") else self.weights_dtype

    def _save(self, output_dir: str | None = None, state_dict=None):
        """transformers' model save; under FSDP in the dtype the model was loaded in, not FSDP's float32 copies,
        and with a config.json that says so (save_pretrained writes the sharded parameters' float32, so loaders that
        follow the config, `dtype="auto"` or vLLM, would upcast the saved weights). Not for adapters
        (`_saved_dtype`), whose folder holds no model config."""
        recast = bool(state_dict) and self._saved_dtype() is not None
        if recast:
            state_dict = {k: v.to(self.weights_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        super()._save(output_dir, state_dict)
        if recast:
            config = self.accelerator.unwrap_model(self.model).config
            config.dtype = self.weights_dtype
            config.save_pretrained(output_dir or self.args.output_dir)

    def save_merged(self, directory: str | None = None) -> str | None:
        """LoRA runs: write the merged model (plain transformers folder) to `directory` (default
        `<output_dir>/merged`); returns its path (main process), or None for a full fine-tune (its checkpoints
        already are). With sharded weights every process must call this."""
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "peft_config"):
            return None
        directory = directory or os.path.join(self.args.output_dir, "merged")
        if not self.sharded:
            return save_merged(model, self.processing_class, directory) if self.args.should_save else None
        # The adapters are sharded: gather them into a saved adapter folder (every process takes part), then the
        # main process merges that into the base model, as `vf-sft export` does.
        adapter = directory + "-adapter"
        self.save_model(adapter)
        merged = None
        if self.args.should_save:
            if not self.model_source:
                raise ConfigError(f"merge_lora with sharded weights reloads the base model, but it was passed as an "
                                  f"object without name_or_path; the adapter is saved in {adapter}: run `vf-sft "
                                  f"export {adapter} --model BASE`")
            # An adapter folder given as model is not the base: the saved adapter records its base.
            base = None if is_adapter_folder(self.model_source) else self.model_source
            merged = export_merged(adapter, directory, base=base)
            shutil.rmtree(adapter)
        self.accelerator.wait_for_everyone()
        return merged


class _Dropped:
    """Metrics that go nowhere: any `add*` call is accepted and forgotten (`VFTrainer._idle_forward`)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
