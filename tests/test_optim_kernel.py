"""The fused step of the compensated bf16 weights (vftrain/kahan_kernel.py, Triton): the same update as the foreach
form it replaces on the GPU, bf16 moments rounded without bias, a skipped (non-finite) step that changes nothing, and
a resume that rounds as the uninterrupted run. On a CUDA machine the kernel runs on the GPU; elsewhere under
Triton's interpreter on the CPU."""

from __future__ import annotations

import io
import os

import pytest
import torch

from vftrain.optim import CompensatedAdamW

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def fused(monkeypatch):
    """CompensatedAdamW steps through the kernel on DEVICE (without CUDA: on the CPU, under Triton's interpreter,
    which conftest.py turns on before anything imports triton)."""
    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"
        monkeypatch.setattr(CompensatedAdamW, "FUSED_DEVICES", ("cpu",))


def _params(seed=0):
    """bf16 weights: several blocks, a ragged tail, a tensor smaller than a block, one of three chunks (a program's
    share, kahan_kernel.CHUNK); and a float32 one (a norm kept in float32: no compensation, its weight holds w
    itself). The bf16 ones step in one launch, the float32 one in another."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [((64, 48), torch.bfloat16), ((5000,), torch.bfloat16), ((3, 7), torch.bfloat16),
              ((2 * 16384 + 77,), torch.bfloat16), ((300,), torch.float32)]
    return [(torch.randn(s, generator=gen) * 0.02).to(dtype).to(DEVICE).requires_grad_() for s, dtype in shapes]


def _run(params, moments, steps, grads_seed=1, optimizer=None, found_inf=None):
    optimizer = optimizer or CompensatedAdamW(params, lr=1e-3, weight_decay=0.1, moments=moments)
    optimizer.found_inf = found_inf
    gen = torch.Generator().manual_seed(grads_seed)
    earlier = []  # gradients kept alive, so that a new one lands at a new address and the kernel's tables must follow
    for step in range(steps):
        for p in params:
            grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)
            if step % 2 and p.grad is not None:
                p.grad.copy_(grad)  # where the last step's tables point
            else:
                earlier.append(p.grad)
                p.grad = grad
        optimizer.step()
    return optimizer


def _kernel_ran(optimizer) -> bool:
    """No build or launch failure sent the optimizer to the foreach form (it would still pass the checks below)."""
    return "FUSED_DEVICES" not in vars(optimizer)


def _held(optimizer, params):
    return [p.detach().float() + optimizer.state[p].get("compensation", torch.zeros(())).float() for p in params]


def test_the_fused_step_is_the_foreach_step(fused, monkeypatch):
    """float32 moments (master_weights = "kahan"): five steps, the moments of both forms agree to float32 rounding
    and the held weights p + c to their own precision, ~16 bits (both forms take the same bias corrections, but
    the GPU's division and square root differ from torch's in the last bit: a last-bit difference in w can round p
    the other way, and c, itself a bf16, then holds the rest with another rounding error). Failed on the H200 while
    the kernel computed 1 - beta2^step as 1 - exp(step x log beta2) with the GPU's approximate exp, and again while
    it computed 1 - beta2 in float32 (second moments 1.3e-5 apart, relative)."""
    kernel_params, foreach_params = _params(), _params()
    kernel = _run(kernel_params, torch.float32, 5)
    assert _kernel_ran(kernel)
    with monkeypatch.context() as mp:
        mp.setattr(CompensatedAdamW, "FUSED_DEVICES", ())
        foreach = _run(foreach_params, torch.float32, 5)
    start = [p.detach().float() for p in _params()]
    for a, b, w0 in zip(_held(kernel, kernel_params), _held(foreach, foreach_params), start):
        assert ((a - b).abs() <= a.abs() * 2**-15 + 1e-7).all()  # 1e-7: weights crossing zero (updates ~2e-3)
        assert (a - b).abs().mean() < 1e-3 * (a - w0).abs().mean()  # far below the update itself
    for pa, pb in zip(kernel_params, foreach_params):
        assert kernel.state[pa]["step"].item() == foreach.state[pb]["step"].item() == 5  # the kernel counts them
        for key in ("exp_avg", "exp_avg_sq"):
            expected = foreach.state[pb][key]
            torch.testing.assert_close(kernel.state[pa][key], expected, rtol=1e-5, atol=1e-6 * expected.abs().max())


def test_bf16_moments_are_rounded_without_bias(fused):
    """One step with the same gradient everywhere: every element's first moment is the same float32 number between
    two bf16 values; rounded to nearest all would take the nearer one, rounded stochastically their mean is the
    number itself."""
    p = torch.zeros(1 << 16, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    optimizer = CompensatedAdamW([p], lr=1e-3, weight_decay=0.0, moments=torch.bfloat16)
    p.grad = torch.ones_like(p)  # 0.1 x that lies between two bf16 values, not half way
    optimizer.step()
    assert _kernel_ran(optimizer)
    exact = torch.tensor(1 - 0.9).item()  # (1 - beta1) x 1, in float32 as the kernel computes it
    m = optimizer.state[p]["exp_avg"].float()
    assert len(m.unique()) == 2  # both neighbours taken
    assert m.mean().item() == pytest.approx(exact, rel=2e-4)
    assert abs(exact - torch.tensor(exact).to(torch.bfloat16).item()) > 5 * abs(exact - m.mean().item())


def test_a_skipped_step_changes_nothing(fused):
    """found_inf = 1 (the NaN guard): NaN gradients reach neither the weights nor the moments, and the step is not
    counted."""
    params = _params()
    optimizer = _run(params, torch.bfloat16, 2)
    before = [t.clone() for p in params for t in (p.detach(), *optimizer.state[p].values())]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    optimizer.found_inf = torch.ones((), device=DEVICE)
    optimizer.step()
    assert _kernel_ran(optimizer)
    after = [t for p in params for t in (p.detach(), *optimizer.state[p].values())]
    assert len(after) == 5 * len(params) - 1  # weights, step counts, moments, compensations (not the float32's)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_resume_rounds_as_the_uninterrupted_run(fused):
    """bf16 moments: three steps in one go, or two, the state saved and loaded into a new optimizer, then the
    third: the same weights and moments, bit for bit (the rounding stream follows the saved step count). The state
    goes through a file read to the CPU, as transformers' resume reads it: torch's load leaves the step counts there,
    and on a GPU the first resumed step crashed on them (the H200's suite)."""
    whole_params = _params()
    whole = _run(whole_params, torch.bfloat16, 3)
    first_params = _params()
    first = _run(first_params, torch.bfloat16, 2)
    file = io.BytesIO()
    torch.save(first.state_dict(), file)
    file.seek(0)
    saved = torch.load(file, map_location="cpu")
    resumed_params = [p.detach().clone().requires_grad_() for p in first_params]
    resumed = CompensatedAdamW(resumed_params, lr=1e-3, weight_decay=0.1, moments=torch.bfloat16)
    resumed.load_state_dict(saved)
    assert all(t.device == p.device for p in resumed_params for t in resumed.state[p].values())
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # the gradients the first two steps used
        for p in resumed_params:
            torch.randn(p.shape, generator=gen)
    for p in resumed_params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)
    resumed.step()
    assert _kernel_ran(whole) and _kernel_ran(resumed)
    for a, b in zip(whole_params, resumed_params):
        assert torch.equal(a.detach(), b.detach())
        for key in ("exp_avg", "exp_avg_sq", "compensation"):
            assert key not in whole.state[a] or torch.equal(whole.state[a][key], resumed.state[b][key])


def test_a_kernel_that_fails_leaves_the_step_to_the_foreach_form(fused, monkeypatch, caplog):
    """A Triton or GPU the kernel was not tried on: a warning, and the foreach form updates every parameter once
    (the bf16 weights' launch runs, the float32 one's fails: the same result as the foreach form throughout)."""
    from vftrain import kahan_kernel

    real, calls = kahan_kernel.step, []

    def second_fails(params, *args):
        calls.append(params)
        if len(calls) == 2:
            raise RuntimeError("PTX compilation failed")
        return real(params, *args)

    monkeypatch.setattr(kahan_kernel, "step", second_fails)
    mixed_params, foreach_params = _params(), _params()
    with caplog.at_level("WARNING", logger="vftrain"):
        mixed = _run(mixed_params, torch.float32, 2)
    assert "the fused step failed (PTX compilation failed); using the foreach step" in caplog.text
    assert len(calls) == 2 and not _kernel_ran(mixed)  # the second step went to the foreach form whole
    with monkeypatch.context() as mp:
        mp.setattr(CompensatedAdamW, "FUSED_DEVICES", ())
        foreach = _run(foreach_params, torch.float32, 2)
    for a, b in zip(_held(mixed, mixed_params), _held(foreach, foreach_params)):
        assert ((a - b).abs() <= a.abs() * 2**-15 + 1e-7).all()


def test_chunk_pairs_cover_every_chunk_of_every_tensor_in_order():
    from vftrain.kahan_kernel import CHUNK, chunk_pairs

    numels = [1, CHUNK, CHUNK + 1, 3 * CHUNK, 7]
    expected = [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (4, 0)]
    pairs = chunk_pairs(numels)
    assert pairs.dtype == torch.int32 and pairs.tolist() == [list(p) for p in expected]


def test_moved_gradients_keep_the_chunk_pairs_and_replace_the_address_table(fused):
    """Gradients at new addresses (the tables rebuilt on every other step in `_run`) give the same update as the
    foreach form (above); the (tensor, chunk) pairs, which depend on the sizes only, are built once."""
    params = _params()
    optimizer = _run(params, torch.bfloat16, 4)
    assert _kernel_ran(optimizer)
    caches = list(optimizer._tables.values())
    built = [id(cache["chunks"]) for cache in caches]
    tables = [id(cache["table"]) for cache in caches]
    _run(params, torch.bfloat16, 1, grads_seed=2, optimizer=optimizer)  # step 0 of _run: new gradient tensors
    assert [id(cache["chunks"]) for cache in caches] == built
    assert [id(cache["table"]) for cache in caches] != tables
