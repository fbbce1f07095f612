"""SFTTrainer: a thin `transformers.Trainer` (through `vftrain.trainer.VFTrainer`, shared with RL) over vftrain's
data path, loss and metrics.

The Trainer keeps what it does well (optimizer, schedule, gradient accumulation with DDP/FSDP no-sync,
checkpointing, integrations). vftrain replaces three pieces:

- the data loader: rows planned into micro-batches by `data.pack` (packed or padded), collated by `data.collate`;
- the loss normaliser: `get_batch_samples` counts the trained tokens of the whole optimizer step on all
  processes, and `compute_loss` divides the summed cross-entropy by that count, so the update is the mean over
  the step's trained tokens however the step is split into micro-batches or processes (transformers#34191,
  prime-rl#1961);
- the loss itself: logits only at trained positions, cross-entropy chunked (`vftrain.loss`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.utils.data import DataLoader

from vftrain.config import SFTConfig
from vftrain.config_checks import trl_arguments
from vftrain.config_given import rebuilt
from vftrain.data import TokenizedRows, prepare_rows
from vftrain.data.collate import IGNORE_INDEX, Collator
from vftrain.data.load import data_seed
from vftrain.data.pack import StepBatchSampler, eval_batches, plan_epoch, steps_per_epoch
from vftrain.errors import ConfigError
from vftrain.loss import cross_entropy_sum, linear_cross_entropy_sum
from vftrain.metrics import EvalLoss, StepStats, row_counts
from vftrain.sampling import held_out_samples, make_backend
from vftrain.sampling.callback import SampleCallback
from vftrain.trainer import VFTrainer

log = logging.getLogger("vftrain")


class SFTTrainer(VFTrainer):
    """Supervised fine-tuning on chat (or text, or pre-tokenized) rows.

    `model`: hub name, local path or loaded model. `train_dataset`: a `datasets.Dataset`, or None to load
    `args.dataset` / `args.dataset_split`. `eval_dataset`: likewise, with `args.eval_split`.
    """

    def __init__(self, model: Any = None, train_dataset: Any = None, args: SFTConfig | None = None,
                 processing_class: Any = None, eval_dataset: Any = None, **kwargs):
        args = rebuilt(args) if args is not None else SFTConfig()  # with the fields set since it was built
        trl_arguments("SFTTrainer", args, kwargs)
        model, tokenizer = self._load_model(model, args, processing_class, prepare=False)
        raw_train, raw_eval = self._raw_splits(train_dataset, eval_dataset, args)
        sample_rows = []
        if args.sample_every_n_steps:
            sample_rows, raw_train = held_out_samples(raw_train, raw_eval, args.num_samples)
        # The main process tokenizes first and datasets caches it; the other ranks then read that cache.
        with args.main_process_first(desc="tokenizing"):
            self.train_rows, self.train_report = prepare_rows(raw_train, tokenizer, args, "train")
            self.eval_rows, self.eval_report = None, None
            if raw_eval is not None:
                self.eval_rows, self.eval_report = prepare_rows(raw_eval, tokenizer, args, "eval")
        if len(self.train_rows) < args.batch_size:
            raise ConfigError(f"batch_size = {args.batch_size} is larger than the {len(self.train_rows)} usable "
                              "training rows")
        model = self._prepare_model(model, args)
        super().__init__(model=model, args=args, train_dataset=self.train_rows, eval_dataset=self.eval_rows,
                         processing_class=tokenizer,
                         data_collator=Collator(tokenizer.pad_token_id, args.packing, args.micro_batch_tokens),
                         **kwargs)
        self.eval_collator = Collator(tokenizer.pad_token_id, args.packing)  # no backward: no token cap
        lines = self.train_report.lines() + self._held_out_lines(len(sample_rows)) + self._epoch_lines()
        # eval_loss is over the kept eval rows: the rows dropped (too long, no trained token) are said as for training
        evaluated = self.eval_report.lines() if self.eval_report is not None else []
        self._setup_run(StepStats(), [f"train data: {line}" for line in lines] + [f"eval data: {line}"
                                                                                   for line in evaluated])
        if sample_rows:
            self.add_callback(SampleCallback(self, sample_rows, make_backend(self)))

    # ---- data
    def _epoch_lines(self) -> list[str]:
        """The rows an epoch leaves out (`pack.steps_per_epoch` takes whole batches only), when training reaches
        the end of an epoch: with num_train_epochs they would otherwise go untrained without a word."""
        rows, batch = len(self.train_rows), self.args.batch_size
        steps, left = divmod(rows, batch)
        if not left or 0 < self.args.max_steps < steps:
            return []
        return [f"an epoch is {steps:,} steps of {batch:,} rows: {steps * batch:,} rows trained per epoch, {left:,} "
                "left out (other ones each epoch, the rows being reshuffled; a batch_size dividing "
                f"{rows:,} leaves none)"]

    def _data_parts(self) -> list:
        rows = self.train_rows  # the buffers themselves (no copy; hashing reads ~1 GB/s)
        return [rows.tokens, rows.masks, rows.offsets]

    def _largest_forward(self, args) -> int:
        """The most tokens one forward of this run will carry: the sampler's plan is fixed by the seed, so every
        epoch the run reaches is planned here (~0.1 s per 100k rows) and its largest micro-batch taken (packed:
        its tokens; padded: rows x its longest row), at most micro_batch_tokens where set (the collator splits
        larger ones)."""
        lengths = self.train_rows.lengths
        per_epoch = steps_per_epoch(len(lengths), args.batch_size)
        epochs = -(-args.max_steps // per_epoch) if args.max_steps > 0 else math.ceil(args.num_train_epochs)
        largest = 0
        for epoch in range(max(epochs, 1)):
            for rows in plan_epoch(lengths, args.batch_size, args.gradient_accumulation_steps * args.world_size,
                                   args.packing, data_seed(args), epoch):
                size = lengths[rows].sum() if args.packing else len(rows) * lengths[rows].max()
                largest = max(largest, int(size))
        return min(largest, args.micro_batch_tokens) if args.micro_batch_tokens else largest

    def get_train_dataloader(self) -> DataLoader:
        sampler = StepBatchSampler(
            self.train_rows.lengths, self.args.batch_size,
            self.args.gradient_accumulation_steps * self.args.world_size, self.args.packing,
            data_seed(self.args), steps_done=lambda: self.state.global_step)
        return self.accelerator.prepare(self._loader(self.train_rows, sampler, self.data_collator))

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """This process's share of the eval rows, each row on one process (`data.pack.eval_batches`). Not passed
        through accelerate, whose even-batch sharding repeats rows; `prediction_step` moves batches to the device."""
        rows = self._eval_rows(eval_dataset)
        batches, counted = eval_batches(rows.lengths, self.args.micro_batch_size, self.args.process_index,
                                        self.args.world_size, lockstep=self.sharded,
                                        budget=self.args.micro_batch_tokens)
        loader = self._loader(rows, batches, self.eval_collator)
        loader.counted = counted  # read by evaluation_loop: the micro-batches after these are lockstep copies
        return loader

    def _eval_rows(self, eval_dataset) -> TokenizedRows:
        """The trainer's eval rows, or the `datasets.Dataset` given to evaluate(), tokenized as the eval split is."""
        if isinstance(eval_dataset, TokenizedRows) or (eval_dataset is None and self.eval_rows is not None):
            return eval_dataset if eval_dataset is not None else self.eval_rows
        if eval_dataset is None:
            raise ConfigError("evaluate() needs held-out rows: set eval_split or eval_size, or pass eval_dataset (to "
                              "the trainer or to evaluate())")
        rows, report = prepare_rows(eval_dataset, self.processing_class, self.args, "eval")
        for line in report.lines():
            log.info("eval data: %s", line)
        return rows

    def _loader(self, rows, batch_sampler, collator) -> DataLoader:
        return DataLoader(rows, batch_sampler=batch_sampler, collate_fn=collator,
                          num_workers=self.args.dataloader_num_workers,
                          pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available())

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and its trained-token count summed over all processes."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        count = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches) if batches else torch.tensor(0)
        count = torch.as_tensor(count, device=device)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return batches, count

    # ---- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss_sum, correct, targets, labels, outputs = self._summed_loss(model, inputs)
        if model.training and num_items_in_batch is not None:
            self.nan_guard.see(loss_sum)
            self._start_throughput(model)
            loss = self.step_normaliser(loss_sum, num_items_in_batch)
            self.stats.add(loss_sum=loss_sum, correct=correct, trained_tokens=targets.numel(),
                           slots=labels.numel(), **row_counts(inputs, labels))
        else:
            loss = loss_sum / max(targets.numel(), 1)
        return (loss, outputs) if return_outputs else loss

    def _summed_loss(self, model, inputs):
        """(summed cross-entropy of the micro-batch's trained tokens, correct predictions, targets, labels, model
        outputs); takes the label entries out of `inputs`."""
        labels = inputs.pop("labels")
        where = (inputs.pop("trained_positions"), inputs.pop("trained_flat"))  # the head runs only there
        values, targets, weight, outputs = self.trained_forward(model, inputs, labels, where)
        loss_sum, correct = (linear_cross_entropy_sum(values, weight, targets) if weight is not None else
                             cross_entropy_sum(values, targets))
        return loss_sum, correct, targets, labels, outputs

    # ---- evaluation
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """transformers' loop (model preparation, callbacks); the loss is `metrics.EvalLoss`: the token mean over
        the whole eval set on all processes, which best-checkpoint selection reads as `eval_loss`."""
        self.eval_loss = EvalLoss(getattr(dataloader, "counted", None))
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        result = self.eval_loss.result(lambda t: self.accelerator.reduce(t, reduction="sum"), self.args.device)
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in result.items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Adds the micro-batch's summed loss and trained tokens to `eval_loss`; returns nothing per batch, so the
        Trainer's loop gathers nothing (one reduction at the end instead). Logits are not returned."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss_sum, correct, targets, _, _ = self._summed_loss(model, inputs)
        self.eval_loss.add(loss_sum, correct, targets.numel())
        return None, None, None
