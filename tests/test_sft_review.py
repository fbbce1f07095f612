"""The SFT review of 2026-12-02 (shared/design/reviews/sft-2026-12-02.md), one test per finding: what "auto" picks
where the varlen kernel cannot run or would be inexact (CUDA simulated on the CPU, as the review did), packing for
models that cannot keep packed rows apart, `none` on the command line, the late NaN flag at epoch ends, master
weights of non-contiguous parameters, rendering of normalised text, FSDP2 adapter saves, fp16 with bf16 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY, addition_rows, small_config, tiny_tokenizer
from vftrain.data.collate import collate_packed
from vftrain.errors import ConfigError


def _tiny(model_type, dtype=torch.bfloat16, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)
    config = AutoConfig.for_model(model_type, **{**sizes, **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@pytest.fixture
def cuda(monkeypatch):
    """A CUDA machine with torch's varlen kernel, of the compute capability the test sets (default: an H100)."""
    from vftrain import attention

    capability = {"value": (9, 0)}
    monkeypatch.setattr(attention, "kernel_available", lambda device=None: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    return capability


def _chosen(model, requested="auto"):
    import vftrain as vf

    model, _ = vf.get_model_and_tokenizer(model, attn_implementation=requested, tokenizer=tiny_tokenizer())
    return model.config._attn_implementation


# ---- 1. auto picks varlen only where the kernel runs and is exact
def test_auto_picks_varlen_only_on_ampere_or_newer_in_16_bit(cuda):
    import vftrain as vf

    def chosen(dtype):
        return vf.get_model_and_tokenizer(TINY, dtype=dtype)[0].config._attn_implementation

    assert chosen("bfloat16") == "varlen"
    assert chosen("float16") == "varlen"
    assert chosen("float32") == "sdpa"  # the kernel takes float16/bfloat16 only
    cuda["value"] = (7, 5)  # T4: bf16 "supported" through emulation, no FlashAttention
    assert chosen("bfloat16") == "sdpa"
    with pytest.raises(ConfigError, match=r"varlen' cannot run this model here: this GPU \(compute capability 7.5"):
        vf.get_model_and_tokenizer(TINY, dtype="bfloat16", attn_implementation="varlen")
    cuda["value"] = (8, 0)
    with pytest.raises(ConfigError, match="varlen' cannot run this model here: float32 weights"):
        vf.get_model_and_tokenizer(TINY, dtype="float32", attn_implementation="varlen")


@pytest.mark.parametrize("model_type, extra, reason", [
    ("gemma4_text", dict(head_dim=8, num_global_key_value_heads=2), r"head size 512 \(the kernel takes at most 256"),
    ("deepseek_v3", dict(qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=16,
                         n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, first_k_dense_replace=1),
     "q/k head size 24 with v head size 16"),
    ("qwen2", dict(head_dim=12), r"head size 12 \(the kernel takes at most 256, a multiple of 8"),
    ("qwen2", dict(head_dim=8, attention_dropout=0.1), r"attention dropout \(attention_dropout = 0.1"),
    ("gpt2", dict(n_embd=32, n_head=4, n_layer=2), r"attention dropout \(attn_pdrop = 0.1"),
])
def test_auto_keeps_the_models_attention_where_the_kernel_refuses_or_drops_something(cuda, model_type, extra,
                                                                                    reason):
    """Gemma 4's full-attention layers (global_head_dim 512 by default), MLA's q/k 24 vs v 16 (DeepSeek-V3), a
    head size not a multiple of 8, and attention dropout (the kernel has none): "auto" keeps SDPA, an explicit
    "varlen" names the reason."""
    assert _chosen(_tiny(model_type, **extra)) == "sdpa"
    with pytest.raises(ConfigError, match=reason):
        _chosen(_tiny(model_type, **extra), "varlen")
    assert _chosen(_tiny("qwen2", head_dim=8)) == "varlen"  # the control: the same sizes otherwise


def test_varlen_hands_the_kernel_q_k_v_in_one_16_bit_dtype_under_autocast(monkeypatch):
    """float32 weights under bf16 autocast: RoPE leaves q and k in float32, v comes out bf16; transformers' flash
    path casts all three to the autocast dtype, and the kernel needs them alike."""
    import vftrain as vf
    from vftrain import attention

    seen = []
    kernel = attention._segmented_sdpa  # what runs in place of the CUDA kernel here

    def record(q, k, v, *args):
        seen.append((q.dtype, k.dtype, v.dtype))
        return kernel(q, k, v, *args)

    monkeypatch.setattr(attention, "_segmented_sdpa", record)
    model = vf.get_model_and_tokenizer(TINY, dtype="float32", attn_implementation="varlen")[0].eval()
    batch = _packed_batch((5, 7), vocab=95)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch, use_cache=False)
    assert seen and set(seen) == {(torch.bfloat16,) * 3}


# ---- 3. Llama 4's chunked attention
def _packed_batch(lengths, vocab=128):
    rng = np.random.default_rng(0)
    rows = [(rng.integers(3, vocab, n), np.ones(n, dtype=np.uint8)) for n in lengths]
    batch = collate_packed(rows)
    for key in ("labels", "trained_positions", "trained_flat"):
        batch.pop(key)
    return batch


def _packed_minus_alone(model, lengths=(9, 6)) -> float:
    """Largest difference between the logits of packed rows and of each row run alone."""
    batch = _packed_batch(lengths)
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0].float()
        starts = batch["cu_seq_lens_q"].tolist()
        alone = torch.cat([model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits[0].float()
                           for a, b in zip(starts[:-1], starts[1:])])
    return (packed - alone).abs().max().item()


def test_chunked_attention_keeps_packed_rows_exact(cuda):
    """Rows longer than attention_chunk_size: "auto" keeps the model's attention (its chunked mask), so each packed
    row equals that row alone; an explicit "varlen" is refused."""
    import vftrain as vf

    def llama4():
        return _tiny("llama4_text", head_dim=8, attention_chunk_size=4, num_local_experts=2, num_experts_per_tok=1,
                     intermediate_size_mlp=64)

    import transformers
    from packaging.version import Version

    model, _ = vf.get_model_and_tokenizer(llama4(), tokenizer=tiny_tokenizer())
    assert model.config._attn_implementation == "sdpa"
    if Version(transformers.__version__) < Version("5.24"):  # the H200's 5.17: 0.22 (its chunked mask on packed
        pytest.skip("transformers < 5.24 does not keep packed rows apart in its chunked mask")  # rows; 5.24 exact)
    assert _packed_minus_alone(model) < 1e-2  # bf16 rounding; across chunk boundaries it was 0.2 (the review)
    with pytest.raises(ConfigError, match=r"chunked attention \(attention_chunk_size = 4\)"):
        vf.get_model_and_tokenizer(llama4(), attn_implementation="varlen", tokenizer=tiny_tokenizer())


# ---- older: packing for models whose attention does not read position_ids
@pytest.mark.parametrize("model_type, extra", [
    ("qwen2", dict(head_dim=8)),
    ("falcon", {}),
    ("bloom", dict(n_head=4, n_layer=2)),
    ("mpt", dict(d_model=32, n_heads=4, n_layers=2)),
    ("opt", dict(ffn_dim=64, word_embed_proj_dim=32)),
])
def test_packing_probe_agrees_with_each_row_alone(model_type, extra):
    """`keeps_rows_apart` says no exactly where packed rows differ from each row alone (Bloom and MPT: ALiBi
    without position_ids; OPT: a mask built without them)."""
    from vftrain import attention

    model = _tiny(model_type, dtype=torch.float32, **extra)
    exact = _packed_minus_alone(model) < 1e-5
    assert attention.keeps_rows_apart(model) == exact
    # Falcon's mask reads position_ids in transformers 5.24, not in 5.17 (the H200's): either way the probe agrees.
    if model_type != "falcon":
        assert exact == (model_type == "qwen2")


def test_packing_is_refused_for_a_model_that_lets_rows_attend_to_each_other(tmp_path):
    import datasets

    import vftrain as vf

    rows = datasets.Dataset.from_list(addition_rows(8))
    with pytest.raises(ConfigError, match=r"packing = true would let packed rows attend .*\(bloom\).*set packing "
                                          "= false"):
        vf.SFTTrainer(model=_tiny("bloom", dtype=torch.float32, n_head=4, n_layer=2), train_dataset=rows,
                      processing_class=tiny_tokenizer(), args=small_config(tmp_path))
    trainer = vf.SFTTrainer(model=_tiny("bloom", dtype=torch.float32, n_head=4, n_layer=2), train_dataset=rows,
                            processing_class=tiny_tokenizer(), args=small_config(tmp_path, packing=False))
    trainer.train()


# ---- 2. `--sft.lora_modules_to_save none`; 8. max_grad_norm unset
def _cli_config(tmp_path, monkeypatch, toml_lines: str, *overrides):
    from conftest import ADDITION, ROOT
    from vftrain.cli.args import parse_argv
    from vftrain.cli.sft import FLAGS, resolve

    monkeypatch.chdir(ROOT)
    toml = tmp_path / "c.toml"
    toml.write_text(f'model = "{TINY}"\ndataset = "{ADDITION}"\n[sft]\n{toml_lines}\n')
    return resolve(parse_argv(["@", str(toml), *overrides], "sft", FLAGS))[1]


def test_lora_modules_to_save_none_on_the_command_line_trains_only_the_adapters(tmp_path, monkeypatch):
    """`none` used to stay the string "none": peft then trained every module whose name ends in n, o or e (each
    self_attn block) in full, 47,360 trainable parameters instead of LoRA's 22,528."""
    import vftrain as vf
    from vftrain.models import apply_lora, count_parameters

    config = _cli_config(tmp_path, monkeypatch, 'use_lora = true\nlora_modules_to_save = ["lm_head"]',
                         "--sft.lora_modules_to_save", "none")
    assert config.lora_modules_to_save is None
    model = apply_lora(vf.get_model_and_tokenizer(TINY)[0], config)
    assert not [name for name, _ in model.named_modules() if name.endswith("modules_to_save")]
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert count_parameters(model)[0] == lora


@pytest.mark.parametrize("value", ["lm_head", ["lm_head", 3]])
def test_lora_modules_to_save_must_be_a_list_of_names(tmp_path, value):
    with pytest.raises(ConfigError, match=r"lora_modules_to_save = .* must be a list of module names"):
        small_config(tmp_path, use_lora=True, lora_modules_to_save=value)


def test_max_grad_norm_none_means_no_clipping(tmp_path, monkeypatch):
    """None passed the config and then crashed the first optimizer step ('>' between NoneType and int); from the
    command line `none` was "the wrong type"."""
    import datasets

    import vftrain as vf

    assert _cli_config(tmp_path, monkeypatch, "", "--sft.max_grad_norm", "none").max_grad_norm == 0.0
    rows = datasets.Dataset.from_list(addition_rows(8))
    losses = {}
    for norm in (None, 0.0):
        trainer = vf.SFTTrainer(model=TINY, train_dataset=rows,
                                args=small_config(tmp_path / str(norm), max_grad_norm=norm, max_steps=2))
        trainer.train()
        losses[norm] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[None] == losses[0.0]


# ---- 4. the one-step-late NaN flag at epoch ends
@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_in_the_last_step_of_an_epoch_is_read_before_the_epoch_save_and_log(tmp_path, monkeypatch, optim,
                                                                                policy):
    """16 rows, 2 steps per epoch, save and log every epoch, the loss NaN in step 2 (the last of epoch 1). The
    fused optimizer's flag used to be read a step late: "stop" published checkpoint-2 (the bad step counted as
    done: a resume skipped its batch), "skip" logged the next, clean epoch as NaN as well."""
    import datasets

    import vftrain as vf
    import vftrain.sft.trainer as trainer_module
    from vftrain.guards import NonFiniteLossError

    args = small_config(tmp_path, max_steps=-1, num_train_epochs=3, save_strategy="epoch", logging_strategy="epoch",
                        optim=optim, nan_policy=policy)
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(16)), args=args)
    real = trainer_module.linear_cross_entropy_sum

    def poisoned(*a, **kw):
        loss, correct = real(*a, **kw)
        return (loss * float("nan"), correct) if trainer.state.global_step == 1 else (loss, correct)

    monkeypatch.setattr(trainer_module, "linear_cross_entropy_sum", poisoned)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="at optimizer step 2"):
            trainer.train()
        assert not list((tmp_path / "out").glob("checkpoint-*"))
        return
    trainer.train()
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert sorted(losses) == [2, 4, 6] and np.isnan(losses[2])
    assert np.isfinite(losses[4]) and np.isfinite(losses[6])


def test_an_out_of_memory_save_reads_the_pending_nan_flag_first(tmp_path, monkeypatch):
    """Out of memory in the step after a bad one (fused AdamW, flag not read yet): the emergency checkpoint would
    have held the bad step as done; "stop" raises instead of saving it."""
    import datasets

    import vftrain as vf
    import vftrain.sft.trainer as trainer_module
    from vftrain.guards import NonFiniteLossError

    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(32)),
                            args=small_config(tmp_path, max_steps=4, logging_steps=10))
    real = trainer_module.linear_cross_entropy_sum

    def bad_then_exhausted(*a, **kw):
        if trainer.state.global_step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        loss, correct = real(*a, **kw)
        return (loss * float("nan"), correct) if trainer.state.global_step == 1 else (loss, correct)

    monkeypatch.setattr(trainer_module, "linear_cross_entropy_sum", bad_then_exhausted)
    with pytest.raises(NonFiniteLossError, match="at optimizer step 2"):
        trainer.train()
    assert not list((tmp_path / "out").glob("checkpoint-*"))


# ---- 7. float32 master weights of a non-contiguous parameter
@pytest.mark.parametrize("fused", [False, True])
def test_master_weights_of_a_transposed_parameter_follow_plain_float32_adamw(fused):
    """A (3, 5) bf16 parameter stored transposed (strides (1, 3)): its master took the parameter's strides while
    its gradient came contiguous from the flat buffer, and fused AdamW updated element i with another's gradient
    (max difference 0.2 at lr 0.1)."""
    from vftrain.optim import master_weights, use_float32_master_weights

    torch.manual_seed(0)
    values = torch.randn(3, 5)
    grad = torch.randn(3, 5)
    param = torch.nn.Parameter(values.to(torch.bfloat16).t().contiguous().t())
    assert param.stride() == (1, 3)
    optimizer = use_float32_master_weights(torch.optim.AdamW([param], lr=0.1, fused=fused))
    reference = torch.nn.Parameter(param.detach().float().contiguous())
    expected = torch.optim.AdamW([reference], lr=0.1, fused=fused)
    for _ in range(2):
        param.grad = grad.to(torch.bfloat16).t().contiguous().t()  # autograd gives the parameter's layout
        reference.grad = param.grad.float().contiguous()
        optimizer.step()
        expected.step()
    (_, master), = master_weights(optimizer)
    torch.testing.assert_close(master, reference.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(param.detach(), reference.detach().to(torch.bfloat16), rtol=0, atol=0)


# ---- 6. the datasets floor
def test_the_datasets_floor_has_the_api_the_data_path_uses():
    """datasets.List (tokenize.py's features; load.py's null stripping of lists of structs) came in datasets 4.0; 3.x,
    which the floor allowed, crashed every run at tokenization."""
    import sys

    import datasets
    from packaging.requirements import Requirement

    from conftest import ROOT

    tomllib = __import__("tomllib" if sys.version_info >= (3, 11) else "tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "datasets").specifier
    assert not spec.contains("3.6.0") and spec.contains("4.0.0")
    assert hasattr(datasets, "List")


# ---- 9. assistant text the tokenizer normalises
def _byte_level_nfc_tokenizer():
    """A byte-level BPE tokenizer (every byte round-trips) with Qwen2's NFC normaliser and the tiny chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>",
                            "pad_token": "<|im_end|>"})
    tok.chat_template = tiny_tokenizer().chat_template
    return tok


@pytest.mark.parametrize("form", ["NFC", "NFD"])
def test_assistant_text_the_tokenizer_normalises_is_trained(form):
    """Decomposed accents (macOS text, Korean jamo) decode composed under Qwen's NFC normaliser; the rewritten-turn
    check compared the decoded text with the raw message and dropped the row as "chat template drops part of an
    assistant message"."""
    import unicodedata

    from vftrain.data.render import Renderer

    answer = unicodedata.normalize(form, "Crème brûlée, s'il vous plaît")
    tok = _byte_level_nfc_tokenizer()
    [row] = Renderer(tok, "messages")({"messages": [{"role": "user", "content": "Dessert?"},
                                                    {"role": "assistant", "content": answer}]})
    trained = tok.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m])
    assert unicodedata.normalize("NFC", answer) in trained


# ---- older: bf16 weights, fp16 autocast and master weights
def test_fp16_autocast_with_bf16_weights_and_master_weights_is_refused(tmp_path):
    """GradScaler.unscale_ found no gradients on the float32 masters: clipping saw scaled gradients (norm 48016
    against 0.733) and scaler.step raised 'No inf checks were recorded for this optimizer'."""
    import datasets

    import vftrain as vf

    rows = datasets.Dataset.from_list(addition_rows(8))
    trainer = vf.SFTTrainer(model=TINY, train_dataset=rows,
                            args=small_config(tmp_path, dtype="bfloat16", fp16=True, bf16=False, max_steps=1))
    with pytest.raises(ConfigError, match="fp16 = true with bfloat16 weights and master_weights = 'kahan-bf16' "):
        trainer.train()  # the default mode, named as it is (the message said true whatever the mode)
    trainer = vf.SFTTrainer(model=TINY, train_dataset=rows, args=small_config(
        tmp_path / "b", dtype="bfloat16", fp16=True, bf16=False, max_steps=1, master_weights=True))
    with pytest.raises(ConfigError, match="fp16 = true with bfloat16 weights and master_weights = true "):
        trainer.train()


# ---- 10. FSDP2 + LoRA adapter saves
def test_sharded_lora_save_keeps_the_adapters_dtype_and_writes_no_model_config(tmp_path):
    """Under FSDP every floating tensor of the gathered state dict was cast to the base weights' dtype (bf16), LoRA
    adapters included, and a base config.json was written beside adapter_config.json. The save path of a sharded
    run, on one process: the trainer told FSDP is on, handed the full state dict as the gather returns it."""
    import datasets
    from safetensors.torch import load_file

    import vftrain as vf

    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)),
                            args=small_config(tmp_path, dtype="bfloat16", use_lora=True))
    trainer.is_fsdp_enabled = True
    out = tmp_path / "adapter"
    state = {k: v.float() if v.is_floating_point() else v for k, v in trainer.model.state_dict().items()}
    trainer._save(str(out), state_dict=state)
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and {v.dtype for v in saved.values()} == {torch.float32}
    assert (out / "adapter_config.json").exists() and not (out / "config.json").exists()
