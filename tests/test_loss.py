"""The chunked cross-entropy equals PyTorch's, in value and gradient, without a float32 copy of the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vftrain.loss import cross_entropy_sum, select_trained


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_matches_torch_cross_entropy_value_gradient_and_accuracy(chunk):
    torch.manual_seed(0)
    logits = torch.randn(50, 33, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 33, (50,))
    loss, correct = cross_entropy_sum(logits, labels, chunk=chunk)
    (2.0 * loss).backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref = F.cross_entropy(logits.float().double(), labels, reduction="sum")
    (2.0 * ref).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, logits.grad, rtol=1e-6, atol=1e-7)
    assert int(correct) == int((logits.argmax(-1) == labels).sum())


def test_bfloat16_logits_get_bfloat16_gradient_close_to_float32():
    torch.manual_seed(1)
    base = torch.randn(64, 100)
    labels = torch.randint(0, 100, (64,))
    logits = base.bfloat16().requires_grad_()
    loss, _ = cross_entropy_sum(logits, labels, chunk=16)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = F.cross_entropy(base.bfloat16().float(), labels, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)


def test_empty_selection_gives_zero_loss_connected_to_graph():
    logits = torch.randn(0, 10, requires_grad=True)
    loss, correct = cross_entropy_sum(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(correct) == 0


def test_trained_position_selection():
    from vftrain.data.collate import trained_index

    labels = torch.tensor([[-100, 5, -100, 7], [-100, -100, -100, 2]])
    where = trained_index(labels)
    assert where["trained_positions"].tolist() == [1, 3] and where["trained_flat"].tolist() == [0, 1, 3]
    values = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3)  # [batch, kept positions, dim]
    flat, targets = select_trained(values, labels, where["trained_positions"], where["trained_flat"])
    assert targets.tolist() == [5, 7, 2] and flat[:, 0].tolist() == [0.0, 3.0, 9.0]


@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_cross_entropy_matches_logits_path(weight_grad):
    from vftrain.loss import linear_cross_entropy_sum

    torch.manual_seed(2)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=weight_grad)
    labels = torch.randint(0, 50, (37,))
    loss, correct = linear_cross_entropy_sum(hidden, weight, labels, chunk=8)
    (3.0 * loss).backward()
    got_h, got_w = hidden.grad.clone(), weight.grad.clone() if weight_grad else None
    hidden.grad = None
    if weight_grad:
        weight.grad = None
    ref = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    (3.0 * ref).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, hidden.grad)
    if weight_grad:
        torch.testing.assert_close(got_w, weight.grad)
    else:
        assert weight.grad is None
    assert int(correct) == int(((hidden @ weight.T).argmax(-1) == labels).sum())


class _LiveBytes(TorchDispatchMode):
    """The peak of tensor storage bytes created inside the block and still alive: what a GPU's allocator would hold
    (on the CPU, peak RSS also counts the fp32 copies oneDNN makes for bf16 matmuls, which a GPU does not)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key, size):
        self.seen.discard(key)
        self.live -= size


@pytest.mark.parametrize("loss", ["sft", "rl"])
def test_the_fused_heads_weight_gradient_holds_no_float32_copies(loss):
    """The fused head's weight gradient: a float32 accumulator over chunks (4 bytes per head parameter), each chunk's
    product added into it, then scaled into the bf16 gradient. Adding a float32 copy of each product, and scaling the
    whole accumulator at once in float32, held 12.5 bytes per head parameter at the peak (1.2 GB more at a 1.3B
    Llama-style shape's 152k x 2048 head, at the end of its forward with every activation held); now under 10."""
    from vftrain.loss import linear_cross_entropy_sum, token_loss_sum

    rows, vocab, hidden = 256, 65536, 1024
    h = torch.randn(rows, hidden, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden, dtype=torch.bfloat16) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (rows,))
    with _LiveBytes() as live:
        if loss == "sft":
            total, _ = linear_cross_entropy_sum(h, w, labels)
        else:
            total, _ = token_loss_sum(lambda logp, s, e: (-logp, torch.zeros(e - s, 1)), labels, hidden=h, weight=w)
        (total / 3).backward()
    assert live.peak / w.numel() < 10, live.peak / w.numel()
    assert w.grad.dtype == torch.bfloat16 and w.grad.abs().sum() > 0
