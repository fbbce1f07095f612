"""Where a training step's memory peaks (for `throughput.py --memory-points`): per forward of every step, the memory
allocated when the forward ends (the model's output and every activation kept for the backward; the loss not yet
computed) and the peak over the whole slot (the forward, the loss and the backward), in GiB. vftrain.memory's
estimate models the peak as the forward's end; a slot peak well above it puts the peak in the backward."""

from __future__ import annotations

import torch

GIB = 2**30


class MemoryPoints:
    def __init__(self, trainer):
        self.steps: list[list[dict]] = []
        forward = trainer.trained_forward
        step = trainer.training_step

        def probed_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            self.steps[-1].append({"forward_end": round(torch.cuda.memory_allocated() / GIB, 2)})
            return out

        def probed_step(model, inputs, num_items_in_batch=None):
            if trainer.state.global_step + 1 > len(self.steps):
                self.steps.append([])
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            loss = step(model, inputs, num_items_in_batch)
            self.steps[-1].append({"slot_start": round(before / GIB, 2),
                                   "slot_peak": round(torch.cuda.max_memory_allocated() / GIB, 2)})
            return loss

        trainer.trained_forward, trainer.training_step = probed_forward, probed_step

    def report(self) -> list[list[dict]]:
        return self.steps
