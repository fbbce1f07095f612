"""Where a training step's memory peaks (for `throughput.py --memory-points`): per forward of every step, the memory
allocated when the forward ends (the model's output and every activation kept for the backward; the loss not yet
computed) and the peak over the whole slot (the forward, the loss and the backward), in GiB. vftrain.memory's
estimate models the peak as the forward's end; a slot peak well above it puts the peak in the backward. Also the
estimate itself beside the measured peak (`memory_estimate`) and a GPU capped to a smaller card (`cap_card`)."""

from __future__ import annotations

import dataclasses

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


def cap_card(gib: float, device: torch.device) -> None:
    """Make this GPU act as one of `gib` GiB: the caching allocator refuses more (an OOM, as on the smaller card) and
    vftrain's memory planning (`memory.card_bytes`, read before the first step) sees that size."""
    from vftrain import memory

    cap, full = int(gib * 2**30), torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / full), device)
    real = memory.card_bytes
    memory.card_bytes = lambda dev=None: min(real(dev), cap)


def memory_estimate(trainer, tokens: int) -> dict:
    """vftrain.memory's estimate of this run's peak at its largest micro-batch, to set beside the measured one."""
    from vftrain import memory

    model = trainer.accelerator.unwrap_model(trainer.model)
    plan = memory.plan_of(trainer.args, model)
    # at the largest micro-batch the run formed; micro_batch_tokens is set here only to bound the estimate (1.25x the
    # aimed tokens, rarely splitting a slot), so gradients accumulate only with gradient accumulation
    plan = dataclasses.replace(plan, tokens=tokens, accumulates=trainer.args.gradient_accumulation_steps > 1)
    parts = memory.estimate(model, plan)
    return dict(memory_estimate_gib=round(memory.total(parts) / 2**30, 2),
                memory_estimate_parts_gib={k: round(v / 2**30, 2) for k, v in parts.items()})
