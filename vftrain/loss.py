"""Loss functions: pure functions over tensors. SFT and RL share the ignore-index convention (`IGNORE_INDEX`,
labels already shifted so that `labels[t]` is the target of the logits at position t).

Both cross-entropies below compute the gradient during the forward, chunk by chunk, and keep only that gradient
for the backward (the scheme of liger-kernel's fused linear cross-entropy, Hsu et al. 2024): a plain
`F.cross_entropy(logits.float())` keeps a float32 copy of all logits plus the log-softmax, which at a 152k
vocabulary is most of the memory of a small model's step (trl#6858).
"""

from __future__ import annotations

import math

import torch

from vftrain.compile import cuda_compiled
from vftrain.data.collate import IGNORE_INDEX
from vftrain.sampling.tokens import outside_nucleus

# Rows of logits alive (in float32) at once: 2048 x 152k vocabulary = 1.2 GB.
CHUNK = 2048
# The per-token losses (RL) keep more [rows, vocab] buffers per chunk (float32 logits, probabilities made into the
# gradient, the bf16 gradient): ~10 bytes per logit at top_p 1, ~22 at top_p < 1 in half-size chunks (peak RSS of a
# fresh process over one chunk, tests/test_rl_loss.py; ~20 and ~34 before they worked in place). They are held at
# the end of the forward, with every layer's activations: half of CHUNK.
TOKEN_CHUNK = 1024


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


def _scaled(grad_w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rows: int = 8192) -> torch.Tensor:
    """`(grad_w * scale).to(dtype)` a block of rows at a time: the backward starts with every activation held, and
    a whole float32 product of the head's size (0.6 GB at a 152k x 1024 head) would add to that peak."""
    if grad_w.dtype == dtype:
        return grad_w * scale
    out = torch.empty(grad_w.shape, dtype=dtype, device=grad_w.device)
    for s in range(0, grad_w.shape[0], rows):
        out[s:s + rows] = grad_w[s:s + rows] * scale
    return out


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
                grad_w.add_(g.T @ h)  # upcast inside the add: no float32 copy of the product
        ctx.save_for_backward(grad_h, grad_w if need_w else torch.empty(0))
        ctx.need_w = need_w
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss.to(grad_h.dtype)
        return grad_h * scale, _scaled(grad_w, grad_loss, grad_h.dtype) if ctx.need_w else None, None, None


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


# ---- RL: per-token policy-gradient losses over the same fused / chunked head

# Columns of the per-token statistics returned with a token loss: the trainer's logprob and the entropy of its
# distribution, then whatever the token-loss function reports (`POLICY_STATS` for `policy_token_loss`).
TOKEN_COLUMNS = ("logp", "entropy")
POLICY_STATS = ("ratio", "masked", "clipped", "mismatch_kl", "kl")


def policy_token_loss(logp: torch.Tensor, sampler_logp: torch.Tensor, advantages: torch.Tensor, *,
                      epsilon: float = 0.2, epsilon_high: float | None = None, mask_low: float = 0.125,
                      mask_high: float = 8.0, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
                      kl_logp: torch.Tensor | None = None):
    """Per-token loss of the GRPO family, differentiable in `logp` (and `kl_logp`); all tensors [N] (float32).

    ratio = exp(logp - sampler_logp) against the logprob the sampler drew the token with, so the ratio measures the
    real trainer/sampler mismatch (verifiers' RLTrainer; trl#4159). Tokens whose ratio lies outside
    [mask_low, mask_high] are masked: loss and gradient 0 (importance-sampling masking, verifiers / prime-rl; a
    mismatch too large to correct). The rest get PPO's clipped surrogate -min(ratio A, clip(ratio, 1 - epsilon,
    1 + epsilon_high) A) (Schulman et al. 2017; asymmetric clip from DAPO, Yu et al. 2025), plus, with beta > 0,
    beta times the k3 estimate of KL(policy || reference) exp(r - l) - (r - l) - 1, r = ref_logp, l = kl_logp
    (default: logp) (Schulman 2020, as in GRPO, Shao et al. 2024). With ratio 1 and no clipping the gradient is
    REINFORCE's -A grad logp. logp = -inf (a token the policy cannot draw: outside its top-p nucleus) is ratio 0:
    masked when mask_low > 0, else a token with no PPO gradient.

    Returns (loss [N], stats [N, 5]): ratio, masked (0/1), clipped (0/1: the clip stopped the gradient), the
    mismatch KL estimate ratio - log ratio - 1 (verifiers' mismatch_kl), and the k3 KL to the reference (0 without
    one), all detached.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    log_ratio = logp - sampler_logp
    lr = log_ratio.detach()
    keep = (lr <= math.log(mask_high)) & ((lr >= math.log(mask_low)) if mask_low > 0 else torch.ones_like(lr,
                                                                                                          dtype=bool))
    ratio = torch.exp(torch.where(keep, log_ratio, torch.zeros_like(log_ratio)))  # masked: no overflow, no grad
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    kl = torch.zeros_like(lr)
    if beta:
        diff = ref_logp - (logp if kl_logp is None else kl_logp)
        kl = diff.exp() - diff - 1
        loss = loss + beta * kl
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    true_ratio = lr.clamp(-20, 20).exp()
    clipped = keep & (((advantages > 0) & (true_ratio > 1 + epsilon_high)) | ((advantages < 0) & (true_ratio < 1 - epsilon)))
    stats = torch.stack([true_ratio, (~keep).float(), clipped.float(), true_ratio - lr.clamp(-20, 20) - 1,
                         kl.detach()], dim=1)
    return loss, stats


def _nucleus(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """x ([n, vocab] logits / temperature) with the tokens outside its top-p nucleus set to -inf.

    The nucleus is the sampler's own (`sampling.tokens.outside_nucleus`, on x in float32 as the sampler computes it:
    same rule, same ties), so on the sampler's weights the trainer's logprob is the one recorded at sampling and the
    ratio is 1 (issue 18.1). vLLM keeps the same set in exact arithmetic, the smallest prefix of the sorted
    probabilities whose mass reaches top_p (its PyTorch path drops a token when the ascending cumulative sum up to it
    is <= 1 - top_p; its Triton kernel searches the same boundary, falling back to keeping more when the search does
    not converge), but rounds differently at the boundary and may keep another of exactly tied tokens: a token that
    vLLM kept and this nucleus drops has ratio 0 here (masked). The set is piecewise constant in x, so gradients flow
    through the kept logits and their normaliser.
    """
    return x.masked_fill(outside_nucleus(x, top_p), float("-inf"))


def _token_chunk(logits: torch.Tensor, labels: torch.Tensor, temperature: float, token_fn, start: int,
                 top_p: float = 1.0):
    """(summed loss, d loss / d logits, per-token stats) of one chunk of a token loss.

    The loss is a function of each token's logprob only, so its gradient in the logits is
    d loss / d logp x (onehot - softmax) / temperature: one [chunk, vocab] buffer, no logits graph kept.
    top_p < 1: the policy is softmax(x) truncated to its nucleus (`_nucleus`) and renormalised, what the sampler drew
    from; token_fn gets that logprob (-inf outside the nucleus) and the untruncated one as a fourth argument, each
    contributing d loss / d logp x (onehot - its own distribution).
    """
    # Buffers of [chunk, vocab]: x, the probabilities (made into the gradient in place), and x again for the entropy
    # (in place, last): ~10 bytes per logit at the peak with bf16 logits, against ~20 when every step allocated its
    # own (at 1,024 rows x 152k vocabulary, 1.5 GB less held at the end of an RL forward; the ~1 GB left at 1,024
    # rows is why TOKEN_CHUNK is half of CHUNK). Same arithmetic in the same order: the same results, bit for bit.
    x = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    if temperature != 1.0:
        x.div_(temperature)
    dists = []  # (logp of each label, normaliser, probabilities): the policy's, then the untruncated one's
    for z in ([x] if top_p >= 1.0 else [_nucleus(x, top_p), x]):
        lse = torch.logsumexp(z, dim=-1)
        dists.append((z.gather(1, labels[:, None])[:, 0] - lse, lse, torch.sub(z, lse[:, None]).exp_()))
    logp, lse, probs = dists[0]
    with torch.enable_grad():
        leaves = [d[0].detach().requires_grad_() for d in dists]
        loss, stats = token_fn(leaves[0], start, start + len(labels), *leaves[1:])
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True) if loss.requires_grad else [None]
    # The entropy of the policy, truncated or not: the distribution rollouts are drawn from and that is trained
    # (x is finite everywhere, so a dropped token's probability 0 adds 0). x is not needed after it.
    entropy = lse - x.mul_(probs).sum(-1)
    del x, z  # the loop's last z is x
    grad = None
    for g, (_, _, p) in zip(grads, dists):
        if g is not None:
            p.mul_(-g[:, None]).scatter_add_(1, labels[:, None], g[:, None])
            grad = p if grad is None else grad.add_(p)
    if grad is None:
        grad = torch.zeros_like(probs)
    elif temperature != 1.0:
        grad.div_(temperature)
    columns = torch.cat([logp[:, None], entropy[:, None], stats.detach().to(entropy.dtype)], dim=1)
    return loss.detach().sum(), grad.to(logits.dtype), columns


class _LinearTokenLoss(torch.autograd.Function):
    """A per-token loss of `hidden @ weight.T / temperature` without holding more than one chunk of logits."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk, token_fn, top_p):
        need_w = ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden)
        wide = torch.promote_types(weight.dtype, torch.float32)  # float32 accumulator, as in _LinearCrossEntropy
        grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_w else None
        loss = torch.zeros((), dtype=wide, device=hidden.device)
        columns = []
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            l_, g, c = _token_chunk(h @ weight.T, labels[s:s + chunk], temperature, token_fn, s, top_p)
            loss += l_
            columns.append(c)
            grad_h[s:s + chunk] = g @ weight
            if need_w:
                grad_w.add_(g.T @ h)  # upcast inside the add: no float32 copy of the product
        ctx.save_for_backward(grad_h, grad_w if need_w else torch.empty(0))
        ctx.need_w = need_w
        stats = torch.cat(columns)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), _scaled(grad_w, grad_loss, grad_h.dtype) if ctx.need_w else None,
                None, None, None, None, None)


class _LogitsTokenLoss(torch.autograd.Function):
    """A per-token loss of given logits / temperature, chunk by chunk (ZeRO-3 and post-processed heads)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk, token_fn, top_p):
        grad = torch.empty_like(logits)
        loss = torch.zeros((), dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        columns = []
        for s in range(0, logits.shape[0], chunk):
            l_, grad[s:s + chunk], c = _token_chunk(logits[s:s + chunk], labels[s:s + chunk], temperature, token_fn, s,
                                                    top_p)
            loss += l_
            columns.append(c)
        ctx.save_for_backward(grad)
        stats = torch.cat(columns)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def token_loss_sum(token_fn, labels: torch.Tensor, *, hidden: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None, logits: torch.Tensor | None = None, temperature: float = 1.0,
                   chunk: int = TOKEN_CHUNK, top_p: float = 1.0):
    """Sum over tokens of `token_fn(logp, start, end) -> (loss [n], stats [n, k])`, where logp are the log-softmax
    probabilities of `labels` under `logits / temperature` (or `hidden @ weight.T / temperature`, fused: no logits
    held) and [start, end) the chunk's token positions, for slicing per-token inputs.

    top_p < 1: logp is that of the same distribution truncated to its top-p nucleus by the sampler's rule and
    renormalised (-inf for a label outside it), the gradient flowing through the kept mass too, and token_fn is
    called `token_fn(logp, start, end, full_logp)` with the untruncated logp as well; the entropy column is the
    truncated distribution's. top_p = 1 computes nothing more.

    Returns (loss_sum: float32 scalar, differentiable; stats [N, 2 + k]: logp, entropy, then token_fn's stats).
    """
    n = labels.shape[0]
    if n == 0:
        source = hidden if hidden is not None else logits
        return source.sum() * 0.0, torch.zeros((0, 2), device=source.device)
    if top_p < 1.0:  # the nucleus (sort, int64 order, cumulative sums) about doubles a chunk's float32 buffers
        chunk = max(chunk // 2, 1)  # (2,048 rows x 152k vocabulary, CPU peak: 1.5 GB at top_p 0.9 in 512-row
        # chunks, 3.3 GB in 1,024-row ones, 1.8 GB at top_p 1 in 1,024-row ones)
    if hidden is not None:
        return _LinearTokenLoss.apply(hidden, weight, labels, temperature, chunk, token_fn, top_p)
    return _LogitsTokenLoss.apply(logits, labels, temperature, chunk, token_fn, top_p)
