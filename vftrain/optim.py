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

import torch

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
        if saved is None:  # a checkpoint from a run without master weights: start them from the loaded model
            saved = [p.detach() for p, _ in pairs]
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
