"""Shared fixtures: the bundled tiny model and tokenizer, real chat templates, small datasets. No network."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import Version

# Without CUDA, Triton kernels run under Triton's interpreter (tests/test_optim_kernel.py): chosen when triton and
# each kernel are first imported, so before anything imports them (importing torch does not).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# transformers before 5.24 (the H200's 5.17) loads a multi-process CPU run's optimizer state with map_location 'cpu:0',
# which torch.load refuses: resuming such a run cannot be tested there.
OLD_CPU_RESUME = Version(metadata.version("transformers")) < Version("5.24")
OLD_CPU_RESUME_REASON = ("transformers < 5.24 loads a multi-process CPU run's optimizer state with map_location "
                         "'cpu:0', which torch.load refuses")

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-chat")
ADDITION = str(ROOT / "assets" / "addition")
TEMPLATES = Path(__file__).parent / "fixtures" / "templates"

# Special tokens each real template writes, and the token that ends an assistant turn for that family.
FAMILIES = {
    "qwen2.5": dict(specials=["<|im_start|>", "<|im_end|>"], eos="<|im_end|>", bos=None),
    "llama3.1": dict(specials=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                     eos="<|eot_id|>", bos="<|begin_of_text|>"),
    "gemma2": dict(specials=["<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"], eos="<eos>", bos="<bos>"),
    # Phi-3 ends a turn with <|end|> and the whole conversation with eos.
    "phi3": dict(specials=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], eos="<|endoftext|>", bos=None),
}
# Templates whose renderings the standard tests do not expect (DeepSeek-R1-distill prefills "<think>\n").
OTHER_FAMILIES = {
    "deepseek-r1-distill": dict(specials=["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                                          "<｜end▁of▁sentence｜>"],
                                eos="<｜end▁of▁sentence｜>", bos="<｜begin▁of▁sentence｜>"),
    # Mistral Nemo: the system message only in a last user turn; its tool tokens are special (control) tokens.
    "mistral": dict(specials=["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                              "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "</s>"], eos="</s>", bos="<s>"),
}


def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def family_tokenizer(family: str):
    """The tiny character-level tokenizer taught a real model family's special tokens and chat template."""
    tok = tiny_tokenizer()
    spec = {**FAMILIES, **OTHER_FAMILIES}[family]
    tok.add_special_tokens({"additional_special_tokens": spec["specials"]})
    tok.eos_token = spec["eos"]
    if spec["bos"]:
        tok.bos_token = spec["bos"]
    tok.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    return tok


# The longest files first. pytest-xdist (`--dist loadfile`, pyproject.toml) hands whole files to its two workers in
# collection order, so a long file collected late ran alone at the end of the suite (about a minute of 11). The
# sort is stable: tests keep their order within a file (test_readme.py's commands depend on it).
LONGEST_FIRST = ("test_vllm.py", "test_distributed.py", "test_checkpoint.py", "test_readme.py", "test_rl.py", "test_sft_then_rl.py",
                 "test_quickstart.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def addition_rows(n: int, start: int = 0) -> list[dict]:
    rows = []
    for k in range(start, start + n):
        a, b = 10 + k % 90, 10 + (k * 7) % 90
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}"}],
                     "completion": [{"role": "assistant", "content": str(a + b)}]})
    return rows


def small_config(tmp_path, **overrides):
    """A few steps on tiny batches, on the CPU also where a GPU is (use_cpu: the tests' exact comparisons are CPU
    semantics, float32 without liger or varlen; tests/gpu.sh)."""
    import vftrain as vf

    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, batch_size=8, micro_batch_size=8, max_seq_len=64,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                dataloader_pin_memory=False, use_cpu=True)
    base.update(overrides)
    return vf.SFTConfig(**base)


def worker_command(out_dir, max_steps=7, processes=1, **options) -> list[str]:
    """tests/train_worker.py (under torchrun for several processes) with `--option value` for each keyword
    (True: a bare flag)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(29600 + os.getpid() % 1000)] if processes > 1 else [sys.executable]
    flags = []
    for key, value in options.items():
        flags.append("--" + key.replace("_", "-"))
        if value is not True:
            flags.append(str(int(value)) if isinstance(value, signal.Signals) else str(value))
    return [*launcher, str(Path(__file__).parent / "train_worker.py"), str(out_dir), "--max-steps", str(max_steps),
            *flags]


def worker_env(*paths) -> dict:
    """The environment of a training subprocess: no launcher variables, `paths` and tests/ importable (before the
    caller's PYTHONPATH, which may hold packages: tests/gpu.sh installs some into /tmp/site), and no GPU: its checks
    (exact resume, signals, process splits over gloo) are CPU semantics, also on a CUDA machine (tests/gpu.sh)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (*paths, Path(__file__).parent, Path(__file__).parent.parent,
                                                          env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_worker(out_dir, max_steps=7, processes=1, **options) -> subprocess.CompletedProcess:
    return subprocess.run(worker_command(out_dir, max_steps, processes, **options), env=worker_env(),
                          capture_output=True, text=True, timeout=300)
