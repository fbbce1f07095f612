"""GPU correctness checks for the fast paths that CPU tests cannot reach (run before benchmarking).

1. "varlen" attention (torch.nn.attention.varlen, FlashAttention underneath) against SDPA with transformers'
   packed block-causal mask, on a packed batch of a Qwen2.5-0.5B-shaped model (2 layers), bf16.
2. The fused linear cross-entropy (compiled chunk function) against float32 `F.cross_entropy(h @ W.T)`, value
   and gradients, bf16 inputs at a 152k vocabulary.
3. A row's loss does not change with its pack neighbours under varlen.
4. lean_mlp (vftrain/mlp.py, compiled backward) against the stock MLP's gradients, bf16.
5. Sliding windows under varlen (the kernel's window_size) against eager attention on each row alone: Mistral and
   Gemma 2 (soft-capping off) with sliding_window=4; and what attn_implementation = "auto" picks (varlen for Qwen2,
   not for Gemma 2 with its attention soft-capping).
Prints one line per check with the relative error; exits 1 if a check fails. `--attention`: checks 1, 3 and 5
only (no torch.compile warm-up).
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from vftrain import attention  # noqa: E402
from vftrain.data.collate import collate_packed  # noqa: E402
from vftrain.loss import linear_cross_entropy_sum  # noqa: E402


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def model(attn):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
                               tie_word_embeddings=True, rope_theta=1e6)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn).cuda().eval()


def rows(lengths, seed):
    rng = np.random.default_rng(seed)
    return [(rng.integers(100, 150000, n), np.ones(n, dtype=np.uint8)) for n in lengths]


def packed(row_list):
    """Model inputs of a packed micro-batch, on the GPU (the loss-only keys removed)."""
    b = collate_packed(row_list)
    for key in ("labels", "trained_positions", "trained_flat"):
        b.pop(key)
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}


def lean_mlp_error() -> float:
    """Largest relative gradient error of the lean SwiGLU MLP against the stock one (bf16, 2 layers)."""
    from vftrain.mlp import use_lean_mlp

    grads = []
    for lean in (False, True):
        m = model("varlen").train()
        if lean:
            use_lean_mlp(m)
        inputs = packed(rows([700, 1500, 900], 4))
        out = m(**inputs, use_cache=False).logits
        out.float().pow(2).mean().backward()
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if "mlp" in n})
    return max(rel(grads[1][n], grads[0][n]) for n in grads[0])


def head_and_mlp_ok() -> bool:
    """Checks 2 and 4."""
    torch.manual_seed(3)
    hidden = (torch.randn(8192, 896, device="cuda") * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(151936, 896, device="cuda") * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, 151936, (8192,), device="cuda")
    loss, correct = linear_cross_entropy_sum(hidden, weight, labels)
    loss.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    h32, w32 = hidden.float().detach().requires_grad_(), weight.float().detach().requires_grad_()
    ref = F.cross_entropy(h32 @ w32.T, labels, reduction="sum")
    ref.backward()
    errs = (rel(loss, ref), rel(gh, h32.grad), rel(gw, w32.grad))
    ok = errs[0] < 1e-3 and errs[1] < 2e-2 and errs[2] < 2e-2
    print("fused linear CE vs fp32 reference: loss %.1e, d hidden %.1e, d weight %.1e" % errs, flush=True)
    err = lean_mlp_error()
    ok &= err < 2e-2
    print(f"lean MLP (compiled backward) vs stock MLP, bf16 gradients: rel err {err:.1e}", flush=True)
    return ok


def window_errors():
    """Relative error of varlen (packed) against eager (each row alone) with sliding_window=4, per family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(vocab_size=151936, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, sliding_window=4)
    errors = {}
    for family, extra in (("mistral", {}), ("gemma2", dict(attn_logit_softcapping=None,
                                                           final_logit_softcapping=None))):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **shape, **extra), dtype=torch.bfloat16,
                                             attn_implementation="eager").cuda().eval()
        row_list = rows([300, 37, 500], 5)
        alone = torch.cat([m(input_ids=torch.as_tensor(ids, device="cuda")[None], use_cache=False).logits[0]
                           for ids, _ in row_list])
        m.set_attn_implementation("varlen")
        errors[family] = rel(m(**packed(row_list), use_cache=False).logits[0], alone)
    return errors


def auto_choices():
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for family, extra in (("qwen2", {}), ("gemma2", dict(attn_logit_softcapping=50.0))):
        cfg = AutoConfig.for_model(family, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, **extra)
        out[family] = attention.choose(AutoModelForCausalLM.from_config(cfg), "auto", packing=True)
    return out


def main():
    attention.register()
    ok = True
    with torch.no_grad():
        inputs = packed(rows([700, 1500, 37, 2048, 900], 0))
        ref = model("sdpa")(**inputs, use_cache=False).logits
        out = model("varlen")(**inputs, use_cache=False).logits
        err = rel(out, ref)
        ok &= err < 2e-2
        print(f"varlen vs sdpa (packed, bf16): rel err {err:.2e}", flush=True)

        m = model("varlen")
        target = rows([900], 1)
        alone = m(**packed(target), use_cache=False).logits[0]
        left, right = rows([300, 50], 2)
        inside = m(**packed([left, *target, right]), use_cache=False).logits[0, 300:1200]
        err = rel(inside, alone)
        ok &= err < 2e-2
        print(f"varlen row independent of pack neighbours: rel err {err:.2e}", flush=True)

    if "--attention" not in sys.argv:
        ok &= head_and_mlp_ok()
    with torch.no_grad():
        for family, err in window_errors().items():
            ok &= err < 2e-2
            print(f"varlen sliding_window=4 vs eager per row, {family} (bf16): rel err {err:.2e}", flush=True)
    choices = auto_choices()
    ok &= choices == {"qwen2": "varlen", "gemma2": None}
    print(f"attn 'auto' picks: {choices} (None: the model's own attention)", flush=True)
    print("ALL OK" if ok else "FAILED", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
