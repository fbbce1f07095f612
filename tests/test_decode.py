"""The decoding step's attention (`attention.decode_attention_forward`): grouped K/V heads read once, only the
filled columns of the static cache read, and rollouts that are those of transformers' own attention."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv

from conftest import TINY
from vftrain import attention
from vftrain.sampling import tokens


class _Module:
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("columns", [None, 5, 12])
def test_decode_attention_is_sdpa_over_repeated_heads(columns):
    """One query token, 6 query heads over 2 K/V heads, left padding and unwritten columns masked: the same output
    as SDPA over K/V repeated to every head (what transformers runs), whatever number of columns is read as long as
    it covers the unmasked ones."""
    torch.manual_seed(0)
    rows, kv, groups, width, dim = 3, 2, 3, 12, 8
    query = torch.randn(rows, kv * groups, 1, dim)
    key, value = torch.randn(rows, kv, width, dim), torch.randn(rows, kv, width, dim)
    mask = torch.zeros(rows, 1, 1, width, dtype=torch.bool)
    for r, start in enumerate([0, 2, 4]):  # left padding, then columns up to 5 written
        mask[r, 0, 0, start:5] = True
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=0.3).transpose(1, 2)
    with attention.decode_columns(columns):
        got, _ = attention.decode_attention_forward(_Module(), query, key, value, mask, scaling=0.3)
    assert got.shape == (rows, 1, kv * groups, dim)
    torch.testing.assert_close(got, expected)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _failed_captures(monkeypatch) -> list:
    """Records every CUDA-graph capture that fails (decoding then goes on eagerly: the same tokens, ~4x slower)."""
    failed, end_failed = [], tokens._end_failed_capture
    monkeypatch.setattr(tokens, "_end_failed_capture", lambda stream: (failed.append(1), end_failed(stream)))
    return failed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width_step,lora", [(3, False), (256, False), (3, True)])
def test_static_decoding_reading_filled_columns_samples_what_the_dynamic_cache_does(monkeypatch, width_step, lora,
                                                                                    device):
    """Rollouts with decode attention over a static cache read in steps of 3 columns (a new width every 3 tokens;
    on CUDA a graph per width, replayed, none failing) are transformers' dynamic-cache rollouts: same tokens,
    logprobs and endings; also through LoRA adapters (RL after a LoRA SFT)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(tokens._Forward, "WIDTH_STEP", width_step)
    failed = _failed_captures(monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).to(device)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # B random (not peft's zeros): the adapters change the tokens
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    runs = {graphs: tokens.sample(model, prompts, n=2, max_new_tokens=14, temperature=0.9, top_p=1.0,
                                  stop_ids=set(range(20, 32)), pad_id=96, seed=3, batch_size=6, graphs=graphs)
            for graphs in (True, False)}
    static, dynamic = [[s for group in runs[g] for s in group] for g in (True, False)]
    assert [s.completion_ids for s in static] == [s.completion_ids for s in dynamic]
    assert max(len(s.completion_ids) for s in static) > 6  # several widths were read
    for a, b in zip(static, dynamic):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored after sampling
    assert not failed


def test_decoding_uses_the_decode_attention(monkeypatch):
    """The static-cache decoder runs its one-token steps through the decode attention (the grouped-head,
    filled-columns path), not transformers' SDPA with repeat_kv."""
    from transformers import AutoModelForCausalLM

    calls = []
    original = attention.decode_attention_forward

    def counted(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    from transformers import AttentionInterface

    attention.register()
    monkeypatch.setitem(AttentionInterface._global_mapping, attention.DECODE, counted)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    tokens.sample(model, [[3, 4, 5]], n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, stop_ids={999},
                  pad_id=96, seed=0, graphs=True)
    layers = model.config.num_hidden_layers
    assert calls.count(1) == 3 * layers  # steps 2..4 decode one token per row through it


@pytest.mark.parametrize("device", DEVICES)
def test_stopped_rows_leave_the_decoding_batch_without_changing_a_sample(monkeypatch, device):
    """Rows that have stopped are dropped from the static cache's batch (checked every 2 steps here) once they are
    half of it, down to a power of two (a batch shape seen before: new shapes cost kernel selection and graph
    captures at every RL step): the rollouts stay those of the dynamic cache, which never drops a row, token for
    token. On CUDA the smaller batch's graphs are captured (no fallback to eager decoding)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(tokens, "_COMPACT_EVERY", 2)
    sizes = []
    select = tokens._Forward.select
    monkeypatch.setattr(tokens._Forward, "select", lambda self, live: (sizes.append(live.numel()), select(self, live)))
    failed = _failed_captures(monkeypatch)  # captures after a compaction failed on the H200 (session 30)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).to(device)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12], [13, 14, 15, 16]]
    runs = {graphs: tokens.sample(model, prompts, n=4, max_new_tokens=16, temperature=1.0, top_p=1.0,
                                  stop_ids=set(range(20, 50)), pad_id=96, seed=5, graphs=graphs)
            for graphs in (True, False)}
    static, dynamic = [[s for group in runs[g] for s in group] for g in (True, False)]
    assert sizes and sizes[0] <= 8  # 16 rows, then at most half of them
    assert all(size & (size - 1) == 0 for size in sizes), sizes
    assert not failed
    assert [s.completion_ids for s in static] == [s.completion_ids for s in dynamic]
    assert [s.finish_reason for s in static] == [s.finish_reason for s in dynamic]
    for a, b in zip(static, dynamic):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
