"""A run leaves the process's CUDA state usable and reports only the device it ran on: a failed graph capture must
not break later CUDA random ops (it did: every later trainer in the process stopped at its first torch.randn), and a
run pinned to the CPU on a CUDA machine neither measures the GPU nor reports its memory."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY
from vftrain import metrics
from vftrain.sampling import tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_a_failed_graph_capture_falls_back_and_leaves_cuda_random_ops_working(monkeypatch, caplog):
    """A decoding step that reads a device value on the host (as data-dependent MoE routing does) cannot be captured:
    decoding goes on eagerly with the same tokens, and CUDA's random number generator still works afterwards."""
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).to("cuda")

    def host_read(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            ids.sum().item()  # a host sync: not allowed while a stream is captured

    model.register_forward_pre_hook(host_read, with_kwargs=True)
    monkeypatch.setattr(tokens._Forward, "warned", False)
    kw = dict(n=2, max_new_tokens=10, temperature=0.9, top_p=1.0, stop_ids=set(range(20, 32)), pad_id=96, seed=3)
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    with caplog.at_level("WARNING", logger="vftrain"):
        captured = tokens.sample(model, prompts, graphs=True, **kw)
    assert "decoding without CUDA graphs (capture failed" in caplog.text
    eager = tokens.sample(model, prompts, graphs=False, **kw)
    assert [[s.completion_ids for s in g] for g in captured] == [[s.completion_ids for s in g] for g in eager]
    torch.randn(4, device="cuda")  # raised "Offset increment outside graph capture encountered unexpectedly"
    torch.nn.functional.dropout(torch.ones(8, device="cuda"), 0.5)


def test_a_cpu_run_on_a_cuda_machine_measures_no_gpu(monkeypatch):
    """use_cpu = true on a GPU machine: no GPU matmul benchmark (it ran one, and a broken CUDA state then stopped the
    CPU run), no MFU against the GPU's peak, no GPU memory in the logs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine, as far as the run can tell

    def no_gpu():
        raise AssertionError("the GPU was measured for a CPU run")

    monkeypatch.setattr(metrics, "measured_matmul_peak", no_gpu)
    clock = metrics.Throughput(AutoModelForCausalLM.from_pretrained(TINY))
    logs = {"tokens": 1000, "trained_tokens": 100}
    clock.update(logs, attn_sq=0.0)
    assert logs["tokens_per_second"] > 0 and "mfu" not in logs and "peak_memory_gib" not in logs
