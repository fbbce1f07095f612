"""Float32 master weights for 16-bit models: the optimizer updates float32 copies and writes them back rounded.

Why: AdamW's update is about `learning_rate` per element, while a bf16 weight of magnitude w changes only in
steps of w / 128 (8 significant bits). At lr 2e-5 and |w| ~ 0.02 most updates round to zero, so a model trained
in pure bf16 barely moves: on a Qwen2.5-0.5B shape, 30 steps at lr 2e-5 lowered the loss by 0.17 in pure bf16
and by 0.96 with float32 master weights (benchmarks/RESULTS.md, "Precision"). The forward and backward still run
on the bf16 weights (full speed); the cost is 8 bytes per trainable parameter (the float32 copy, and Adam's
moments in float32 instead of bf16). FSDP2 (accelerate upcasts the sharded weights) and DeepSpeed's bf16
optimizer keep float32 master weights themselves, so this applies to single-GPU and DDP runs.

Why by hand: the Trainer's optimizers update the parameters they are given; mixed-precision master copies live
in Megatron/DeepSpeed optimizers, not in a small library that plugs into torch.optim (apex's O2 is deprecated).
The hooks below keep a stock torch optimizer (fused AdamW by default) and every Trainer feature that reads it:
schedulers, gradient clipping on the model's gradients, checkpoints (the master copies are saved in the
optimizer's state dict, so a resume is exact).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("vftrain")
LOW_PRECISION = (torch.bfloat16, torch.float16)
_KEY = "vftrain_float32_master"


def needs_master_weights(params) -> bool:
    return any(p.requires_grad and p.dtype in LOW_PRECISION for p in params)


def master_weights(optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model parameter, float32 master copy) pairs of an optimizer set up by `use_float32_master_weights`."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return list(getattr(optimizer, "vftrain_master_weights", []))


def use_float32_master_weights(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Re-point a freshly built optimizer (no state yet) from its 16-bit parameters to float32 copies of them."""
    if optimizer.state:
        raise RuntimeError("master weights must be set up before the optimizer's first step")
    pairs = []  # (model parameter, float32 master), in param_groups order
    for group in optimizer.param_groups:
        masters = []
        for p in group["params"]:
            if p.dtype in LOW_PRECISION:
                # A new leaf tensor, contiguous: its gradient is a view of one flat buffer (grads_in), and fused
                # AdamW pairs a parameter's elements with its gradient's in storage order, so a master that kept a
                # transposed parameter's strides got another element's gradient.
                master = p.detach().to(torch.float32, memory_format=torch.contiguous_format)
                pairs.append((p, master))
                masters.append(master)
            else:
                masters.append(p)
        group["params"] = masters

    def grads_in(opt, args, kwargs):
        # One float32 buffer and one foreach copy into views of it: a `.to(float32)` per parameter cost ~20 us of
        # host time each (~6 ms per step at 0.5B, time the GPU waits for when the step is host-bound).
        having = [(p, m) for p, m in pairs if p.grad is not None]
        for p, m in pairs:
            m.grad = None
        if not having:
            return
        flat = torch.empty(sum(p.numel() for p, _ in having), dtype=torch.float32, device=having[0][0].device)
        views = [v.view(p.shape) for v, (p, _) in zip(flat.split([p.numel() for p, _ in having]), having)]
        torch._foreach_copy_(views, [p.grad for p, _ in having])
        for (_, m), view in zip(having, views):
            m.grad = view

    @torch.no_grad()
    def weights_out(opt, args, kwargs):
        torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
        for _, m in pairs:
            m.grad = None

    def save(opt, state_dict):
        state_dict[_KEY] = [m.detach().clone() for _, m in pairs]

    @torch.no_grad()
    def load(opt, state_dict):
        saved = state_dict.pop(_KEY, None)
        if saved is None:  # a checkpoint without master weights: start them from the loaded model, plus the
            # compensation of a checkpoint of master_weights = 'kahan' / 'kahan-bf16' (p + c is the weight it held)
            ids = [i for g in state_dict["param_groups"] for i in g["params"]]
            masters = [p for g in opt.param_groups for p in g["params"]]
            held = {id(m): state_dict["state"].get(i, {}).pop("compensation", None) for i, m in zip(ids, masters)}
            saved = [p.detach().float() + (0 if held[id(m)] is None else held[id(m)].to(p.device).float())
                     for p, m in pairs]
        if len(saved) != len(pairs):
            raise ValueError(f"checkpoint has {len(saved)} float32 master weights, this model {len(pairs)}")
        for (p, m), value in zip(pairs, saved):
            m.copy_(value)
            p.copy_(m)
        return state_dict

    optimizer.vftrain_master_weights = pairs  # read by master_weights()
    optimizer.register_step_pre_hook(grads_in)
    optimizer.register_step_post_hook(weights_out)
    optimizer.register_state_dict_post_hook(save)
    optimizer.register_load_state_dict_pre_hook(load)
    return optimizer


# ---- compensated bf16 weights: AdamW whose updates survive bf16 without a float32 copy

# Parameter elements per pass of the step: bounds the float32 temporaries (about 6 buffers of this many floats,
# ~0.8 GB) whatever the model's largest tensor (a 151,936 x 2048 embedding is 311M elements).
_SEGMENT = 1 << 25
KAHAN_MODES = {"kahan": torch.float32, "kahan-bf16": torch.bfloat16}  # master_weights value -> moments dtype


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 -> bfloat16 rounded up or down at random in proportion to the dropped low 16 bits, so the rounding is
    unbiased in expectation (torchao's `_fp32_to_bf16_sr`, torchao/optim/quant_utils.py: truncate the low half of
    the float32 bits, and add one bf16 unit in the last place with probability low half / 2^16)."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, device=x.device, dtype=torch.int32, generator=generator)
    truncated = bits & -65536  # 0xFFFF0000 as a signed int32
    rounded = torch.where(noise < (bits & 0xFFFF), truncated + 0x10000, truncated)
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


class CompensatedAdamW(torch.optim.Optimizer):
    """AdamW (torch's, decoupled weight decay) on bf16/fp16 weights kept with a same-sized compensation buffer: the
    weight w is held as p + c, p the model's 16-bit parameter and c the rounding error of the last write (Kahan
    summation applied to the update, as in Zamirai et al. 2020, "Revisiting BFloat16 Training", compensated
    summation). Each step computes w = p + c in float32, applies the AdamW update, writes p = round(w) and
    c = w - p. p + c carries ~16 significant bits, so updates of ~lr per element are kept where a bare bf16 weight
    rounds them away; the cost is 2 bytes per parameter where a float32 master copy costs 4 (plus a float32
    gradient copy at every step). Moments are float32 ("kahan") or bfloat16 ("kahan-bf16", 4 bytes less per
    parameter), stored with stochastic rounding so that the slow EMA of the second moment (a change of 1e-3 of its
    value per step at beta2 0.999, below bf16's resolution of 2^-8) still moves on average.

    The step runs in segments of at most `_SEGMENT` elements: a few foreach copies into flat float32 buffers and
    elementwise ops on those, no per-parameter Python work beyond building the views. Like torch's fused AdamW it
    skips a step on the device when `found_inf` (set by the NaN guard) is 1. State per parameter (saved in the
    state dict, so a resume is exact): step, exp_avg, exp_avg_sq, compensation (16-bit parameters only)."""

    _step_supports_amp_scaling = True  # reads found_inf: the NaN guard needs no host sync
    # Where a parameter's step runs as one fused kernel (vftrain/kahan_kernel.py; the tests add "cpu" under Triton's
    # interpreter); elsewhere, and for non-contiguous parameters or gradients, the foreach form below.
    FUSED_DEVICES = ("cuda",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, moments=torch.float32):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments_dtype = moments
        self.found_inf = None
        # Its own random stream for the stochastic rounding: drawing from the global one would change what else
        # draws from it (data order, dropout) by the choice of optimizer. Same seed on every process, so that
        # data-parallel replicas round alike and stay identical. The fused kernel's stream: Philox over (a seed from
        # this count of steps and the parameter's index, the element).
        self.rounding = None
        self.rounding_steps = 0
        self._tables: dict = {}  # per launch: its last device tables (kahan_kernel._tables)

    @classmethod
    def replacing(cls, optimizer: torch.optim.Optimizer, moments: torch.dtype) -> "CompensatedAdamW":
        """The same parameter groups and hyperparameters as a freshly built (stateless) torch AdamW."""
        if optimizer.state or not isinstance(optimizer, torch.optim.AdamW):
            raise RuntimeError("compensated weights replace a fresh torch AdamW")
        keys = ("params", "lr", "betas", "eps", "weight_decay")
        return cls([{k: g[k] for k in keys} for g in optimizer.param_groups], moments=moments)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            low = p.dtype in LOW_PRECISION
            moments = self.moments_dtype if low else p.dtype
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=moments, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moments, memory_format=torch.contiguous_format)
            if low:
                state["compensation"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.rounding_steps += 1
        index = 0  # the parameter's position over all groups: its rounding stream in the fused kernel
        for group in self.param_groups:
            indices = [index + i for i, p in enumerate(group["params"]) if p.grad is not None]
            index += len(group["params"])
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            keep = torch.ones((), device=params[0].device) if self.found_inf is None else 1 - self.found_inf.to(
                params[0].device).reshape(())
            done = self._fused_steps(group, params, states, indices, keep)  # their steps counted there
            rest = [i for i in range(len(params)) if i not in done]
            if not rest:
                continue
            torch._foreach_add_([states[i]["step"] for i in rest], keep)
            corrections = list(zip(*_bias_corrections([states[i] for i in rest], group)))
            for segment in _segments([params[i] for i in rest]):
                self._update(group, [(params[rest[j]], states[rest[j]], a, b) for j, a, b in segment], keep,
                             [corrections[j] for j, _, _ in segment])
        return loss

    def _fused_steps(self, group, params, states, indices, keep) -> set[int]:
        """Step the parameters the fused kernel takes, one launch per kind (kahan_kernel.kind); returns their
        positions in `params`. A kernel that fails to build or launch (a Triton or GPU it was not tried on) leaves
        the rest of this run to the foreach form, with a warning: each parameter is still updated exactly once."""
        done = set()
        fusable = [j for j, p in enumerate(params) if self._fusable(p)]
        if not fusable:
            return done
        from vftrain import kahan_kernel  # triton: imported where a step runs on it only

        kinds: dict[tuple, list[int]] = {}
        for j in fusable:
            kinds.setdefault(kahan_kernel.kind(params[j], states[j]), []).append(j)
        seed_base = self.rounding_steps * 1_000_003 % 2**31  # + the parameter's index, mod 2^31: its Philox seed
        try:
            for kind, js in kinds.items():
                tables = self._tables.setdefault((indices[js[0]], kind), {})
                kahan_kernel.step([params[j] for j in js], [states[j] for j in js], [indices[j] for j in js], keep,
                                  group, seed_base, tables)
                done.update(js)
        except Exception as error:  # noqa: BLE001 - any build or launch failure: the foreach form still works
            self.FUSED_DEVICES = ()
            log.warning("compensated AdamW: the fused step failed (%s); using the foreach step",
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
        return done

    def _fusable(self, p: torch.Tensor) -> bool:
        return (p.device.type in self.FUSED_DEVICES and p.dtype in (torch.bfloat16, torch.float32)
                and p.is_contiguous() and p.grad.is_contiguous())

    def _update(self, group, pieces, keep: torch.Tensor, corrections) -> None:
        """AdamW on one segment: (parameter, state, start, end) slices of the flattened tensors, with each piece's
        parameter's `_bias_corrections`."""
        beta1, beta2 = group["betas"]
        device = pieces[0][0].device

        def cut(t, p, a, b):  # a view of t's slice [a, b); a non-contiguous parameter is taken whole
            return t.reshape(-1)[a:b] if p.is_contiguous() else t

        p_parts = [cut(p, p, a, b) for p, _, a, b in pieces]
        m_parts = [cut(s["exp_avg"], p, a, b) for p, s, a, b in pieces]
        v_parts = [cut(s["exp_avg_sq"], p, a, b) for p, s, a, b in pieces]
        low = [i for i, (_, s, _, _) in enumerate(pieces) if "compensation" in s]
        c_parts = [cut(pieces[i][1]["compensation"], pieces[i][0], *pieces[i][2:]) for i in low]
        w, w_views = _gather(p_parts)
        if low:
            _, c_views = _gather(c_parts)
            torch._foreach_add_([w_views[i] for i in low], c_views)
            del c_views
        g, _ = _gather([cut(p.grad, p, a, b) for p, _, a, b in pieces])
        if self.found_inf is not None:  # a skipped step's gradients may be NaN: nothing of them may reach the state
            g = torch.where(keep > 0, g, torch.zeros((), device=device))
        m, _ = _gather(m_parts)
        v, _ = _gather(v_parts)
        # Bias corrections per element from each parameter's own step count (exact where counts differ).
        counts = torch.tensor([t.numel() for t in p_parts], device=device)
        bc1, bc2 = (torch.stack(bc).repeat_interleave(counts, output_size=w.numel()) for bc in zip(*corrections))
        m.lerp_(g, (1 - beta1) * keep)
        v.lerp_(g.square_(), (1 - beta2) * keep)
        del g
        w.mul_(1 - group["lr"] * group["weight_decay"] * keep)
        denom = v.sqrt().div_(bc2).add_(group["eps"])
        w.addcdiv_(m * (group["lr"] * keep / bc1), denom, value=-1)
        del denom, bc1, bc2
        rounding = self._generator(device) if self.moments_dtype == torch.bfloat16 else None
        _scatter(m_parts, m, rounding)
        _scatter(v_parts, v, rounding)
        torch._foreach_copy_(p_parts, w_views)  # rounded to nearest
        if low:  # c = w - round(w): what the 16-bit weight could not hold
            held = [w_views[i] for i in low]
            torch._foreach_sub_(held, [p_parts[i] for i in low])
            torch._foreach_copy_(c_parts, held)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.rounding is None:
            self.rounding = torch.Generator(device).manual_seed(0)
        return self.rounding

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.rounding is not None:
            state["rounding_rng"] = self.rounding.get_state()
        state["rounding_steps"] = self.rounding_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load casts every floating state to its parameter's dtype: float32 moments of a bf16 parameter
        would come back rounded to bf16. They are put back in the dtype they were saved in, on the parameter's
        device, the step counts too: torch leaves a non-fused AdamW's counts where the file was read to (the CPU,
        for transformers' resume), and the step's bias corrections come from them (a GPU resume crashed at its
        first step, tests/test_cli.py on the H200)."""
        state_dict = dict(state_dict)
        masters = state_dict.pop(_KEY, None)  # a checkpoint of master_weights = true: the float32 weights it held
        rng = state_dict.pop("rounding_rng", None)
        self.rounding_steps = state_dict.pop("rounding_steps", 0)
        saved = [state_dict["state"].get(i) for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        if rng is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            self._generator(params[0].device).set_state(rng)
        params = [p for g in self.param_groups for p in g["params"]]
        for p, values in zip(params, saved):
            for key, value in (values or {}).items():
                if torch.is_tensor(value):
                    dtype = torch.float32 if key == "step" else value.dtype
                    self.state[p][key] = value.to(device=p.device, dtype=dtype)
        self._adopt(params, masters)

    @torch.no_grad()
    def _adopt(self, params: list[torch.Tensor], masters: list[torch.Tensor] | None) -> None:
        """A checkpoint of another master_weights mode (a run resumed after the default changed): float32 master
        weights become p + c, moments take this mode's dtype, and a 16-bit weight without a compensation gets one
        (without it the step would treat it as a float32 weight: pure bf16 updates, rounded away)."""
        low = [p for p in params if p.dtype in LOW_PRECISION]
        if masters is not None and len(masters) != len(low):
            raise ValueError(f"checkpoint has {len(masters)} float32 master weights, this model {len(low)}")
        for i, p in enumerate(low):
            state = self.state.get(p)
            if not state or "compensation" in state:
                continue
            w = masters[i].to(p.device, torch.float32) if masters is not None else p.float()
            p.copy_(w)
            state["compensation"] = (w - p.float()).to(p.dtype)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].to(self.moments_dtype)


def _gather(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One flat float32 buffer holding `tensors` (one foreach copy), and its views shaped like them."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32, device=tensors[0].device)
    views = [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    torch._foreach_copy_(views, tensors)
    return flat, views


def _scatter(parts: list[torch.Tensor], flat: torch.Tensor, rounding: torch.Generator | None) -> None:
    """Write a flat float32 buffer back into `parts`; bf16 ones with stochastic rounding (the moments)."""
    if all(p.dtype == torch.bfloat16 for p in parts):
        flat = stochastic_round_bf16(flat, rounding)
    views = [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in parts]), parts)]
    torch._foreach_copy_(parts, views)


def _bias_corrections(states: list[dict], group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per parameter, on the device: 1 - beta1^step and sqrt(1 - beta2^step) from its float32 step count, as
    torch's fused AdamW computes them (`_foreach_pow`), for the foreach form (the fused kernel works them out in
    double precision itself). Not written into the state: a resume recomputes them from the saved step counts."""
    beta1, beta2 = group["betas"]
    steps = [s["step"] for s in states]
    bc1, bc2 = torch._foreach_pow(beta1, steps), torch._foreach_pow(beta2, steps)
    for bc in (bc1, bc2):
        torch._foreach_neg_(bc)
        torch._foreach_add_(bc, 1)
    torch._foreach_sqrt_(bc2)
    return bc1, bc2


def _segments(params: list[torch.Tensor]) -> list[list[tuple[int, int, int]]]:
    """(parameter index, start, end) slices of the flattened parameters in runs of at most `_SEGMENT` elements (a
    non-contiguous parameter is one whole slice, whatever its size)."""
    out, current, room = [], [], _SEGMENT
    for i, p in enumerate(params):
        n, a = p.numel(), 0
        while a < n:
            b = min(n, a + room) if p.is_contiguous() else n
            current.append((i, a, b))
            room -= b - a
            a = b
            if room <= 0:
                out.append(current)
                current, room = [], _SEGMENT
    if current:
        out.append(current)
    return out
