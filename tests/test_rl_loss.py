"""The RL loss: per-token policy loss (pure) and its fused / chunked evaluation over the output head."""

from __future__ import annotations


import pytest
import torch

from vftrain.loss import policy_token_loss, token_loss_sum


def _inputs(n=37, hidden=16, vocab=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=g)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return h, w, labels, adv


def _policy(sampler_logp, adv, **kw):
    def fn(logp, s, e):
        return policy_token_loss(logp, sampler_logp[s:e].to(logp.dtype), adv[s:e].to(logp.dtype), **kw)
    return fn


def _reference_loss(h, w, labels, sampler_logp, adv, temperature=1.0, **kw):
    """The same loss through plain autograd over full logits (what the chunked, fused path must equal)."""
    logp = (h @ w.T / temperature).log_softmax(-1).gather(1, labels[:, None])[:, 0]
    loss, _ = policy_token_loss(logp, sampler_logp, adv, **kw)
    return loss.sum()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [5, 2048])
def test_chunked_policy_loss_matches_autograd(fused, temperature, chunk):
    h, w, labels, adv = _inputs()
    with torch.no_grad():  # a sampler that disagrees a little: ratios spread around 1, some clipped, some masked
        sampler_logp = (h @ w.T / temperature).log_softmax(-1).gather(1, labels[:, None])[:, 0]
        sampler_logp = sampler_logp + torch.linspace(-2.5, 2.5, len(labels), dtype=torch.float64)
    kw = dict(epsilon=0.2, epsilon_high=0.28, mask_low=0.125, mask_high=8.0)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _reference_loss(h1, w1, labels, sampler_logp, adv, temperature, **kw)
    ref.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    fn = _policy(sampler_logp, adv, **kw)
    if fused:
        loss, stats = token_loss_sum(fn, labels, hidden=h2, weight=w2, temperature=temperature, chunk=chunk)
    else:
        logits = h2 @ w2.T
        loss, stats = token_loss_sum(fn, labels, logits=logits, temperature=temperature, chunk=chunk)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-10) and torch.allclose(w2.grad, w1.grad, atol=1e-10)
    masked, clipped = stats[:, 3], stats[:, 4]
    assert 0 < masked.sum() < len(labels) and clipped.sum() > 0  # the test exercises every branch


def test_on_policy_gradient_is_reinforce():
    """Ratio 1 and no clipping: the gradient is -(1/N) sum A grad log p, computed independently."""
    h, w, labels, adv = _inputs(seed=3)
    w1 = w.clone().requires_grad_()
    logp = (h @ w1.T).log_softmax(-1).gather(1, labels[:, None])[:, 0]
    (-(adv * logp).sum() / len(labels)).backward()
    with torch.no_grad():
        sampler = (h @ w.T).log_softmax(-1).gather(1, labels[:, None])[:, 0]
    w2 = w.clone().requires_grad_()
    loss, stats = token_loss_sum(_policy(sampler, adv), labels, hidden=h, weight=w2)
    (loss / len(labels)).backward()
    assert torch.allclose(w2.grad, w1.grad, atol=1e-12)
    assert torch.allclose(stats[:, 2], torch.ones(len(labels), dtype=stats.dtype))  # the ratio column


def test_zero_advantage_and_masked_tokens_give_no_gradient():
    h, w, labels, adv = _inputs(seed=5)
    with torch.no_grad():
        sampler = (h @ w.T).log_softmax(-1).gather(1, labels[:, None])[:, 0]
    far = sampler.clone()
    far[::2] += 5.0  # ratio e^-5 < 0.125: masked
    adv = adv.clone()
    adv[1::2] = 0.0  # the other half: zero advantage
    w2 = w.clone().requires_grad_()
    loss, stats = token_loss_sum(_policy(far, adv), labels, hidden=h, weight=w2)
    loss.backward()
    assert float(loss) == 0.0 and torch.count_nonzero(w2.grad) == 0
    assert stats[::2, 3].eq(1).all()


def test_kl_penalty_pulls_toward_reference():
    h, w, labels, _ = _inputs(seed=7)
    with torch.no_grad():
        sampler = (h @ w.T).log_softmax(-1).gather(1, labels[:, None])[:, 0]
    zero = torch.zeros_like(sampler)
    w2 = w.clone().requires_grad_()
    # The reference gives every sampled token more probability than the policy: the KL gradient raises logp.
    fn = _policy(sampler, zero, ref_logp=None, beta=0.0)
    loss0, _ = token_loss_sum(fn, labels, hidden=h, weight=w2)
    assert float(loss0) == 0.0

    def with_kl(logp, s, e):
        return policy_token_loss(logp, sampler[s:e], zero[s:e], ref_logp=sampler[s:e] + 1.0, beta=0.1)
    loss, _ = token_loss_sum(with_kl, labels, hidden=h, weight=w2)
    loss.backward()
    # d/dlogp of beta (e^(r-l) - (r-l) - 1) at r - l = 1 is beta (1 - e) < 0: descending raises logp.
    logp = lambda W: (h @ W.T).log_softmax(-1).gather(1, labels[:, None])[:, 0].sum()  # noqa: E731
    assert float(logp(w - 0.01 * w2.grad)) > float(logp(w))
    assert float(loss) == pytest.approx(0.1 * len(labels) * (torch.e - 2), rel=1e-9)


def test_policy_token_loss_is_finite_for_extreme_ratios():
    logp = torch.tensor([0.0, -100.0, -1.0], requires_grad=True)
    sampler = torch.tensor([-100.0, 0.0, -1.0])
    loss, stats = policy_token_loss(logp, sampler, torch.tensor([1.0, -1.0, 2.0]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all() and torch.isfinite(stats).all()
    assert stats[:2, 1].eq(1).all() and logp.grad[:2].eq(0).all()


_PEAK_SCRIPT = """
import resource, sys, torch
from vftrain.loss import token_loss_sum
rows, vocab, top_p = int(sys.argv[1]), 65536, float(sys.argv[2])
hidden = torch.randn(rows, 64).to(torch.bfloat16).requires_grad_()
weight = (torch.randn(vocab, 64) * 0.1).to(torch.bfloat16).requires_grad_()
labels, adv = torch.randint(0, vocab, (rows,)), torch.randn(rows)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss, _ = token_loss_sum(lambda logp, s, e, *full: (-adv[s:e] * logp.clamp(min=-30), torch.zeros(e - s, 1)), labels,
                         hidden=hidden, weight=weight, temperature=0.7, chunk=1024, top_p=top_p)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / (rows * vocab))
"""


@pytest.mark.parametrize("top_p, rows, most", [(1.0, 1024, 14), (0.9, 512, 26)])
def test_a_chunk_of_the_token_loss_holds_few_bytes_per_logit(top_p, rows, most):
    """The [chunk, vocab] buffers of the RL loss are held at the end of the forward with every layer's activations
    (RL's train peak): float32 logits, the probabilities made into the gradient in place, the bf16 gradient, and with
    top_p < 1 the nucleus' sort (in half-size chunks: 22 bytes per logit). With each step allocating its own, and the
    nucleus' intermediates kept to its end, that was 20 bytes per logit at top_p 1 (1.5 GB more at 1,024 rows x 152k
    vocabulary) and 34 at top_p 0.9. Peak RSS of a fresh process over one chunk of `rows` x 65,536, per logit."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(rows), str(top_p)], capture_output=True, text=True,
                         check=True)
    assert float(out.stdout) < most, out.stdout


def test_the_token_loss_leaves_the_callers_logits_as_they_were():
    """The chunk works on its own float32 copy, in place: float32 logits passed in (a post-processed head, ZeRO-3)
    are not that copy."""
    h, w, labels, adv = _inputs()
    logits = (h @ w.T).float().requires_grad_()
    before = logits.detach().clone()
    loss, _ = token_loss_sum(_policy(torch.zeros(len(labels)), adv), labels, logits=logits, temperature=0.7)
    loss.backward()
    assert torch.equal(logits.detach(), before) and logits.grad.abs().sum() > 0
