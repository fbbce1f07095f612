"""Where a small model's training step loses time to the host: forward + backward of the Qwen2.5-0.5B shape on one
packed micro-batch (varlen attention, bf16, random weights built on the GPU), with each choice of layer kernels.

For each variant, per forward+backward: the wall time, the host's time to launch it all, and the GPU's time for the
same work when the host is far ahead (queued behind a GPU sleep). wall >> GPU means host-bound. Variants:
  liger          liger-kernel's RMSNorm, RoPE and SwiGLU (vftrain's default on a GPU today)
  liger-torchrms liger's RoPE and SwiGLU, torch's fused RMSNorm (F.rms_norm: one C++ op, no Triton launcher)
  torchrms       no liger; torch's fused RMSNorm
  eager          no liger; transformers' own modules
  compiled       no liger; torch.compile of each decoder layer (dynamic sequence length), compile time reported
  NAME+autocast  the same inside torch.autocast(bf16), as accelerate's bf16 mixed precision runs the forward
usage (GPU): python benchmarks/layer_kernels.py [--tokens 16384] [--variants liger torchrms ...]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trl_anchor import ARCHS, VOCAB, make_rows  # noqa: E402


def packed_batch(tokens: int, device):
    rows, total = [], 0
    for r in make_rows(2000):
        n = len(r["input_ids"])
        if total + n > tokens:
            break
        rows.append(r["input_ids"])
        total += n
    ids = torch.tensor([i for r in rows for i in r], device=device)[None]
    pos = torch.cat([torch.arange(len(r)) for r in rows]).to(device)[None]
    cu = torch.tensor([0] + [len(r) for r in rows], device=device).cumsum(0).to(torch.int32)
    longest = max(len(r) for r in rows)
    return dict(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                max_length_k=longest)


ORIGINAL_RMS = None


def torch_rms_forward(self, hidden_states):
    return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def build(variant: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from vftrain import attention

    attention.register()
    cfg = AutoConfig.for_model("qwen2", vocab_size=VOCAB, max_position_embeddings=32768, rope_theta=1e6,
                               rms_norm_eps=1e-6, **ARCHS["qwen0.5b"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.set_attn_implementation("varlen")
    if variant.startswith("liger"):
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False,
                                        rms_norm=variant == "liger")
    from transformers.models.qwen2 import modeling_qwen2

    global ORIGINAL_RMS
    ORIGINAL_RMS = ORIGINAL_RMS or modeling_qwen2.Qwen2RMSNorm.forward
    torch_rms = "torchrms" in variant or variant == "compiled"
    modeling_qwen2.Qwen2RMSNorm.forward = torch_rms_forward if torch_rms else ORIGINAL_RMS
    if variant == "compiled":
        torch._dynamo.config.cache_size_limit = 64
        for layer in model.model.layers:
            layer.compile(dynamic=True)
    return model.train()


AUTOCAST = False


def step(model, batch, n_head: int):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=AUTOCAST):
        out = model.model(**batch, use_cache=False)
    hidden = out.last_hidden_state[0, -n_head:]
    logits = model.lm_head(hidden).float()
    loss = torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, -n_head:])
    loss.backward()


def measure(variant: str, tokens: int, iters: int) -> dict:
    global AUTOCAST
    AUTOCAST = variant.endswith("+autocast")  # what accelerate's bf16 mixed precision wraps the forward in
    model = build(variant.removesuffix("+autocast"))
    batch = packed_batch(tokens, "cuda")
    t0 = time.perf_counter()
    step(model, batch, 2048)  # warm-up (and compilation)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(2):
        step(model, batch, 2048)
    torch.cuda.synchronize()
    walls, hosts = [], []
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        step(model, batch, 2048)
        host = time.perf_counter() - t0  # the host returns once everything is launched
        end.record()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
        hosts.append(host * 1e3)
    # Host-bound: the GPU finishes right after the last launch, so wall ~ host launch time.
    import statistics

    out = dict(variant=variant, tokens=int(batch["input_ids"].shape[1]), first_s=round(first, 1),
               wall_ms=round(statistics.median(walls), 1), host_launch_ms=round(statistics.median(hosts), 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))
    gpu_only = gpu_time(model, batch)
    out["gpu_ms_graph_free"] = gpu_only
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def gpu_time(model, batch) -> float:
    """GPU time of the same forward+backward with the host far ahead: launch it after a long GPU sleep, so every
    kernel is queued before the GPU starts; the events then time the kernels alone (the launch queue permitting)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU cycles: the host queues the whole step meanwhile
    start.record()
    step(model, batch, 2048)
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=["liger", "liger-torchrms", "torchrms", "eager", "compiled"])
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name())
    for variant in args.variants:
        try:
            print("RESULT", json.dumps(measure(variant, args.tokens, args.iters)), flush=True)
        except Exception as exc:  # one variant failing must not lose the others
            print("RESULT", json.dumps(dict(variant=variant, error=f"{type(exc).__name__}: {exc}"[:400])), flush=True)


if __name__ == "__main__":
    main()
