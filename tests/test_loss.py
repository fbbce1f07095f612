"""The chunked cross-entropy equals PyTorch's, in value and gradient, without a float32 copy of the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
