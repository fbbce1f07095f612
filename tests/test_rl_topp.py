"""RL with top_p < 1 (issue 18.1): the trainer's policy is the nucleus-truncated distribution the sampler drew
from, so an on-policy step has ratio 1 on every token, clips nothing, and its gradient is the policy gradient of the
truncated distribution."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

import vftrain as vf
from conftest import TINY, addition_rows
from rl_worker import config, digits
from vftrain.data.collate import IGNORE_INDEX
from vftrain.loss import token_loss_sum
from vftrain.sampling.tokens import sampling_logits


def _direct_nucleus(x: torch.Tensor, top_p: float) -> list[list[int]]:
    """Each row's nucleus by the definition: tokens in descending probability, a token kept while the tokens before
    it have not yet reached top_p."""
    out = []
    for row in x.softmax(-1).tolist():
        kept, before = [], 0.0
        for i in sorted(range(len(row)), key=lambda i: -row[i]):
            if before >= top_p:
                break
            kept.append(i)
            before += row[i]
        out.append(kept)
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_truncated_logprob_entropy_and_gradient_match_a_direct_computation(fused, top_p):
    g = torch.Generator().manual_seed(0)
    n, hidden, vocab, temperature = 23, 16, 29, 0.7
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    x = (h @ w.T / temperature).detach()
    nuclei = _direct_nucleus(x, top_p)
    # Labels: mostly inside their row's nucleus (what a sampler draws), every fourth row its least likely token.
    labels = torch.tensor([x[r].argmin().item() if r % 4 == 3 else nuclei[r][r % len(nuclei[r])] for r in range(n)])
    outside = torch.tensor([labels[r].item() not in nuclei[r] for r in range(n)])
    assert outside.any() and not outside.all() and max(len(k) for k in nuclei) > 1

    # Direct: log p(label) - log(kept mass) by plain autograd over full logits; -inf outside the nucleus.
    w1 = w.clone().requires_grad_()
    z = h @ w1.T / temperature
    kept = torch.zeros(n, vocab, dtype=torch.bool)
    for r, k in enumerate(nuclei):
        kept[r, k] = True
    direct = z.masked_fill(~kept, float("-inf")).log_softmax(-1).gather(1, labels[:, None])[:, 0]
    full = z.log_softmax(-1).gather(1, labels[:, None])[:, 0]
    inside = ~outside
    (-(adv[inside] * direct[inside]).sum() + 0.3 * full.sum()).backward()
    q = z.detach().masked_fill(~kept, float("-inf")).softmax(-1)
    entropy = -(q * q.clamp_min(1e-300).log()).sum(-1)

    def fn(logp, s, e, full_logp):  # the policy term on the truncated logp, a term on the untruncated one
        finite = torch.isfinite(logp)
        loss = -adv[s:e] * torch.where(finite, logp, torch.zeros_like(logp)) + 0.3 * full_logp
        return loss, logp.new_zeros((e - s, 0))

    w2 = w.clone().requires_grad_()
    source = dict(hidden=h, weight=w2) if fused else dict(logits=h @ w2.T)
    loss, stats = token_loss_sum(fn, labels, temperature=temperature, chunk=5, top_p=top_p, **source)
    loss.backward()
    assert torch.isneginf(stats[outside, 0]).all()
    torch.testing.assert_close(stats[inside, 0], direct[inside].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats[:, 1], entropy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-10, atol=1e-10)


def _grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("top_p, beta", [(0.7, 0.0), (0.9, 0.0), (1.0, 0.0), (0.7, 0.1)])
def test_on_policy_step_trains_the_truncated_distribution(tmp_path, top_p, beta):
    """One step, embedded sampler, float32, weights not yet moved: ratio 1 on every token and nothing clipped or
    masked; the gradient is -(1/N) sum A grad log p_trunc with p_trunc the sampler's own distribution
    (`sampling_logits` over the model's full logits), computed here independently. With beta > 0 the KL to the
    starting model is 0 and adds no gradient (it compares untruncated logprobs)."""
    cfg = config(str(tmp_path / "out"), 1, save_strategy="no", top_p=top_p, beta=beta, micro_batch_size=4)
    trainer = vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=cfg,
                           reward_funcs=[digits])
    batches, count = trainer.get_batch_samples(iter(range(100)), cfg.gradient_accumulation_steps, "cpu")
    model = trainer.model
    model.zero_grad()
    for batch in batches:
        trainer.compute_loss(model, dict(batch), num_items_in_batch=count).backward()
    got = _grad(model)
    metrics, _ = trainer.stats.pop()
    assert abs(metrics["importance_ratio_min"] - 1) < 1e-5 and abs(metrics["importance_ratio_max"] - 1) < 1e-5
    assert metrics["clipped_frac"] == 0 and metrics["masked_frac"] == 0
    if beta:
        assert metrics["kl"] < 1e-9

    model.zero_grad()
    total, negative, kept_mass = 0.0, 0, []
    for batch in batches:
        labels = batch["labels"][0]
        keep = labels != IGNORE_INDEX
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0][keep]
        logp = sampling_logits(logits, cfg.temperature, top_p).log_softmax(-1).gather(1, labels[keep][:, None])[:, 0]
        sampler_logp, adv = batch["token_values"][0][keep, 0], batch["token_values"][0][keep, 1]
        assert (logp.detach() - sampler_logp).abs().max() < 1e-5  # the sampler drew from exactly this
        full = (logits.float() / cfg.temperature).log_softmax(-1).gather(1, labels[keep][:, None])[:, 0]
        kept_mass.append((full - logp).exp().detach())
        negative += int((adv < 0).sum())
        total = total - (adv * logp).sum()
    (total / count).backward()
    expected = _grad(model).double()
    got = got.double()
    mass = torch.cat(kept_mass)
    assert negative > 0 and expected.abs().max() > 0
    if top_p < 1:  # the truncation is real here: the old ratio (= kept mass) was below 1 - epsilon at 0.7
        assert mass.mean() < 1 - 1e-3 and (top_p > 0.8 or mass.min() < 1 - cfg.epsilon)
    cosine = float(torch.nn.functional.cosine_similarity(got, expected, dim=0))
    assert cosine == pytest.approx(1.0, abs=1e-9) and float(got.norm() / expected.norm()) == pytest.approx(1, abs=1e-5)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-4)
    assert not math.isnan(metrics["entropy"])


@pytest.mark.parametrize("mask_low", [0.125, 0.0])
def test_a_token_outside_the_trainers_nucleus_is_masked(mask_low):
    """Trainer and sampler logits differ at the nucleus boundary (other kernels, bf16, vLLM's rounding): a sampled
    token the trainer's nucleus drops has probability 0 under the policy trained. Ratio 0: masked (mask_low > 0), or
    no PPO gradient (mask_low = 0); the loss and gradient stay finite with the KL term on, which compares the
    untruncated logprob with the reference's."""
    from vftrain.loss import policy_token_loss

    x = torch.tensor([3.0, 2.0, 0.0, -1.0])  # probabilities .70 .26 .03 .01: the 0.8 nucleus is {0, 1}
    logits = torch.stack([x, x]).requires_grad_()
    labels = torch.tensor([3, 0])  # row 0 outside the nucleus, row 1 inside
    full = x.log_softmax(-1)[labels]
    adv, sampler = torch.tensor([-1.0, 0.0]), torch.tensor([-4.0, -0.3])
    ref = torch.tensor([-4.0, float(full[1])])  # row 1: no KL; row 0: k3 of -4 - full[0]

    def fn(logp, s, e, full_logp):
        return policy_token_loss(logp, sampler[s:e], adv[s:e], mask_low=mask_low, ref_logp=ref[s:e], beta=0.1,
                                 kl_logp=full_logp)

    loss, stats = token_loss_sum(fn, labels, logits=logits, top_p=0.8)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert torch.isneginf(stats[0, 0]) and torch.isfinite(stats[1]).all()
    ratio, masked, clipped = stats[0, 2:5]
    assert ratio < 1e-8 and masked == (1.0 if mask_low else 0.0)
    if mask_low:  # masked: the token adds nothing at all
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7) and logits.grad[0].abs().max() == 0
    else:  # ratio 0 and A < 0: the clipped branch, 0.8; only the KL term (untruncated) moves row 0
        d = ref[0] - full[0]
        assert clipped == 1 and logits.grad[0].abs().max() > 0
        assert float(loss.detach()) == pytest.approx(0.8 + 0.1 * float(d.exp() - d - 1), rel=1e-6)
