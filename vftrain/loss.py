"""Loss functions: pure functions over tensors. SFT and RL share the ignore-index convention (`IGNORE_INDEX`,
labels already shifted so that `labels[t]` is the target of the logits at position t)."""

from __future__ import annotations

import torch

from vftrain.data.collate import IGNORE_INDEX

# Rows of logits upcast to float32 at a time: bounds the extra memory to CHUNK x vocab x 4 bytes
# (for a 152k vocabulary, 4096 rows are 2.5 GB) instead of a full float32 copy of the logits (trl#6858).
CHUNK = 4096


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy whose gradient is computed during the forward, chunk by chunk.

    Plain `F.cross_entropy(logits.float(), ...)` keeps a float32 copy of all logits plus the log-softmax for the
    backward. Here only the gradient (same dtype and size as the logits) is kept, as liger-kernel's fused loss
    does: d loss / d logits = softmax(logits) - onehot(label).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk: int):
        grad = torch.empty_like(logits)
        loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        correct = torch.zeros((), dtype=torch.long, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            x = logits[start:start + chunk].float()
            y = labels[start:start + chunk]
            lse = torch.logsumexp(x, dim=-1)
            target = x.gather(1, y[:, None])[:, 0]
            loss += (lse - target).sum()
            correct += (x.argmax(-1) == y).sum()
            g = torch.exp(x - lse[:, None])
            g.scatter_add_(1, y[:, None], torch.full_like(target[:, None], -1.0))
            grad[start:start + chunk] = g.to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK):
    """Sum of token cross-entropies and number of correct argmax predictions.

    logits: [N, vocab] (any float dtype), labels: [N] with values in [0, vocab) (no IGNORE_INDEX: select the
    trained positions first). Returns (loss_sum: float32 scalar, correct: int64 scalar), both on logits.device.
    """
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0  # keeps the graph connected so every rank runs the same backward
        return zero.float(), torch.zeros((), dtype=torch.long, device=logits.device)
    return _ChunkedCrossEntropy.apply(logits, labels, chunk)


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions (dim 1 of [batch, seq] labels) where any row has a trained target."""
    return (labels != IGNORE_INDEX).any(dim=0).nonzero()[:, 0]


def select_trained(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten [batch, positions, vocab] logits and matching [batch, positions] labels to the trained rows."""
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    return logits.reshape(-1, logits.shape[-1])[keep], flat_labels[keep]
