"""Loss functions: pure functions over tensors. SFT and RL share the ignore-index convention (`IGNORE_INDEX`,
labels already shifted so that `labels[t]` is the target of the logits at position t).

Both cross-entropies below compute the gradient during the forward, chunk by chunk, and keep only that gradient
for the backward (the scheme of liger-kernel's fused linear cross-entropy, Hsu et al. 2024): a plain
`F.cross_entropy(logits.float())` keeps a float32 copy of all logits plus the log-softmax, which at a 152k
vocabulary is most of the memory of a small model's step (trl#6858).
"""

from __future__ import annotations

import torch

from vftrain.compile import cuda_compiled
from vftrain.data.collate import IGNORE_INDEX

# Rows of logits alive (in float32) at once: 2048 x 152k vocabulary = 1.2 GB.
CHUNK = 2048


def _ce_chunk(logits: torch.Tensor, labels: torch.Tensor):
    """(summed loss, correct count, d loss / d logits) of one chunk; logits [n, vocab] any float dtype.

    d CE / d logits = softmax(logits) - onehot(label). Compiled on GPU so that the float32 work is one pass.
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(1, labels[:, None])[:, 0]
    grad = torch.exp(x - lse[:, None])
    grad = grad.scatter_add(1, labels[:, None], torch.full_like(target[:, None], -1.0))
    return (lse - target).sum(), (x.argmax(-1) == labels).sum(), grad.to(logits.dtype)


_ce_chunk_fused = cuda_compiled(_ce_chunk)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, chunk):
        fn = _ce_chunk_fused
        grad = torch.empty_like(logits)
        loss = torch.zeros((), dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        correct = torch.zeros((), dtype=torch.long, device=logits.device)
        for s in range(0, logits.shape[0], chunk):
            l_, c_, grad[s:s + chunk] = fn(logits[s:s + chunk], labels[s:s + chunk])
            loss += l_
            correct += c_
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` without ever holding more than one chunk of logits."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        fn = _ce_chunk_fused
        need_w = ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden)
        # float32 accumulator: the weight gradient sums over chunks, bf16 sums would drop low bits.
        wide = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_w else None
        loss = torch.zeros((), dtype=wide, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            l_, c_, g = fn(h @ weight.T, labels[s:s + chunk])
            loss += l_
            correct += c_
            grad_h[s:s + chunk] = g @ weight
            if need_w:
                grad_w += (g.T @ h).to(wide)
        ctx.save_for_backward(grad_h, grad_w if need_w else torch.empty(0))
        ctx.need_w = need_w
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss.to(grad_h.dtype)
        return grad_h * scale, (grad_w * grad_loss).to(grad_h.dtype) if ctx.need_w else None, None, None


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK):
    """Sum of token cross-entropies and number of correct argmax predictions.

    logits: [N, vocab] (any float dtype); labels: [N] in [0, vocab) (select trained positions first).
    Returns (loss_sum: float32 scalar (float64 for float64 logits), correct: int64 scalar).
    """
    if logits.shape[0] == 0:
        return _empty(logits)
    return _ChunkedCrossEntropy.apply(logits, labels, chunk)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK):
    """`cross_entropy_sum(hidden @ weight.T, labels)` without materialising the logits.

    hidden: [N, H] final hidden states at trained positions; weight: [vocab, H] output head; labels: [N].
    """
    if hidden.shape[0] == 0:
        return _empty(hidden)
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk)


def _empty(x: torch.Tensor):
    zero = x.sum() * 0.0  # keeps the graph connected so every rank runs the same backward
    return zero.float(), torch.zeros((), dtype=torch.long, device=x.device)


def select_trained(values: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                   flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `values` ([batch, len(positions), dim], computed at `positions` only) that have a target,
    flattened, with those targets. `positions` and `flat` come from `data.collate.trained_index`."""
    targets = labels[:, positions].reshape(-1).index_select(0, flat)
    return values.reshape(-1, values.shape[-1]).index_select(0, flat), targets
