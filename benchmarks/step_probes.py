"""Probes of where a training step's time goes, for benchmarks/throughput.py: CUDA-event spans and host time per
part of the step (`Breakdown`), host-device syncs (`sync_report`), cProfile (`python_profile`) and torch.profiler
(`host_profile`) over a few steps after the warm-up."""
import time
from pathlib import Path

import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_report(start: int, steps: int):
    """A callback listing every host-device synchronisation over `steps` steps after the warm-up
    (torch.cuda.set_sync_debug_mode): a sync makes the GPU wait while the host launches the next kernels."""
    import collections
    import traceback
    import warnings

    from transformers import TrainerCallback

    seen = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename][-6:]
        seen[" <- ".join(f"{Path(f.filename).name}:{f.lineno}({f.name})" for f in reversed(frames))] += 1

    class SyncReport(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == start:
                warnings.simplefilter("always")
                self.previous, warnings.showwarning = warnings.showwarning, record
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == start + steps:
                torch.cuda.set_sync_debug_mode(0)
                warnings.showwarning = self.previous
                print(f"SYNCS over {steps} steps: {sum(seen.values())}", flush=True)
                for where, n in seen.most_common(20):
                    print(f"SYNC {n:4d}  {where}", flush=True)

    return SyncReport()


def python_profile(start: int, steps: int):
    """A callback running cProfile alone (no torch.profiler, which slows every op) over `steps` steps after the
    warm-up: the host's Python time by function, by own time and by cumulative time."""
    import cProfile
    import pstats

    from transformers import TrainerCallback

    class PythonProfile(TrainerCallback):
        python, t0 = None, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == start and self.python is None:
                self.python, self.t0 = cProfile.Profile(), time.perf_counter()
                self.python.enable()

        def on_step_end(self, args, state, control, **kwargs):
            if self.python is not None and state.global_step == start + steps:
                self.python.disable()
                print(f"PYPROFILE ms per step (cProfile on): {(time.perf_counter() - self.t0) * 1e3 / steps:.1f}")
                stats = pstats.Stats(self.python)
                stats.sort_stats("tottime").print_stats(35)
                # The Trainer's own per-step calls (callbacks, logging, scheduler, zero_grad) and vftrain's
                stats.sort_stats("cumulative").print_stats("trainer|callback|vftrain|accelerate|optim|data", 70)

    return PythonProfile()


def gpu_busy_ms(events) -> float:
    """The GPU's busy time of a profile's key averages: its kernels' (and copies') own time, as the op table's "Self
    CUDA time total" counts it. Summing every event's self device time counted each kernel twice, once under the op
    that launched it (benchmarks/RESULTS.md, session 33)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e3


def host_profile(start: int, steps: int):
    """A callback running torch.profiler over `steps` steps after the warm-up: prints the ops with the most host
    (self CPU) time and the GPU's busy time against the wall time, to show what the host does while the GPU waits,
    then the ops with the most GPU time, to show what the GPU's step is made of."""
    from transformers import TrainerCallback

    class HostProfile(TrainerCallback):
        def __init__(self, start: int, steps: int):
            self.start, self.steps, self.prof, self.t0 = start, steps, None, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == self.start and self.prof is None:
                from torch.profiler import ProfilerActivity, profile

                import cProfile

                sync()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.python = cProfile.Profile()  # Python functions' host time (the op table has no Python frames)
                self.python.enable()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is None or state.global_step != self.start + self.steps:
                return
            import pstats

            sync()
            wall = (time.perf_counter() - self.t0) * 1e3 / self.steps
            self.python.disable()
            self.prof.__exit__(None, None, None)
            pstats.Stats(self.python).sort_stats("cumulative").print_stats(45)
            events = self.prof.key_averages()
            gpu = gpu_busy_ms(events) / self.steps
            print(f"PROFILE ms per step (both profilers on): wall {wall:.1f}, GPU busy {gpu:.1f}", flush=True)
            print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70), flush=True)
            print("PROFILE by GPU time", flush=True)  # what the GPU spends its step on (kernels, GEMM shapes)
            print(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70), flush=True)
            self.prof = None

    return HostProfile(start, steps)


class Breakdown:
    """Where a timed step's time goes: CUDA events around the forward+backward of each micro-batch (the fused head's
    forward inside it, shown apart), gradient clipping and the optimizer step (master-weight copies included),
    read after the run, so nothing syncs the host in between. The rest of the step's wall time is host work the
    GPU waited for, plus small GPU work outside these spans (zero_grad, scheduler)."""

    HEAD, STEP = "head forward (fused loss, inside fwd+bwd)", "forward+backward"

    def __init__(self, trainer, meter):
        import vftrain.sft.trainer as sft

        self.trainer, self.meter, self.spans, self.host = trainer, meter, {}, {}
        sft.linear_cross_entropy_sum = self.timed(self.HEAD, sft.linear_cross_entropy_sum)
        sft.cross_entropy_sum = self.timed("head forward (model logits)", sft.cross_entropy_sum)
        trainer.training_step = self.timed(self.STEP, trainer.training_step)
        trainer.accelerator.clip_grad_norm_ = self.timed("grad-norm clipping", trainer.accelerator.clip_grad_norm_)
        # Host time only (no GPU span): what the host spends launching each part. With no sync in the step, the
        # host runs ahead of the GPU unless these add up to more than the GPU's work.
        trainer.get_batch_samples = self.timed("get_batch_samples (load, collate, copy)", trainer.get_batch_samples,
                                               gpu=False)
        trainer.compute_loss = self.timed("compute_loss (forward, head)", trainer.compute_loss, gpu=False)
        trainer.accelerator.backward = self.timed("backward", trainer.accelerator.backward, gpu=False)
        create = trainer.create_optimizer

        def create_optimizer(model=None):
            fresh = trainer.optimizer is None
            optimizer = create(model)
            if fresh:
                optimizer.step = self.timed("optimizer step (incl. master weights)", optimizer.step)
            return optimizer

        trainer.create_optimizer = create_optimizer

    def mark(self):
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def timed(self, name, fn, gpu=True):
        def run(*args, **kwargs):
            if self.trainer.state.global_step < self.meter.warmup:
                return fn(*args, **kwargs)
            start, clock = self.mark() if gpu else None, time.perf_counter()
            out = fn(*args, **kwargs)
            self.host[name] = self.host.get(name, 0.0) + time.perf_counter() - clock
            if gpu:
                self.spans.setdefault(name, []).append((start, self.mark()))
            return out

        return run

    def report(self, seconds: float) -> dict:
        sync()
        steps = self.trainer.state.global_step - self.meter.warmup
        ms = {name: sum(a.elapsed_time(b) if hasattr(a, "elapsed_time") else (b - a) * 1e3
                        for a, b in pairs) / steps for name, pairs in self.spans.items()}
        ms["step (wall)"] = seconds * 1e3 / steps
        ms["rest: host work and idle"] = ms["step (wall)"] - sum(v for k, v in ms.items()
                                                                  if k not in ("step (wall)", self.HEAD)
                                                                  and not k.startswith("head"))
        ms.update({f"host: {k}": v * 1e3 / steps for k, v in self.host.items()})
        return {k: round(v, 2) for k, v in ms.items()}
