"""SFT throughput of vftrain's SFTTrainer against TRL's, on one GPU: same data, same model shape, bf16.

What runs: for each --arch, a random-weight Qwen2.5-shaped model (trl_anchor.ARCHS, vocab 151936) is trained for
--steps optimizer steps on trl_anchor.make_rows(6000): pre-tokenized rows of random token ids, prompt and
completion lengths log-normal, at most 2048 tokens, loss on the completion only.
- vftrain: rows packed into micro-batches of about --seq tokens (--mbs rows; default: --seq / mean row length),
  one micro-batch per optimizer step, as in the anchor. Options: --lora, --gc, --attn (e.g. varlen), --vf-liger.
- TRL (--trl): `trl_anchor.py trl_packed ARCH --liger` in its own process (BFD packing into 2048-token
  sequences, --seq / 2048 of them per micro-batch); skipped with a note when trl is missing, or for --lora
  (the anchor has no LoRA mode).

How it is measured: steps before --warmup are not timed. A training_step hook counts every micro-batch on the
device, without a host sync: real tokens (packed: the whole [1, T] input_ids; padded: attention_mask), trained
tokens (labels != -100) and the sum of squared row lengths (sum over tokens of 2 * position_id + 1). CUDA is
synchronized when the window opens (first micro-batch of step --warmup) and after the last step (not at train()'s
return: the run summary and plot after it are not training).
MFU = (6 x matmul params x real tokens + 6 x layers x hidden x sum(len^2)) / time / bf16 matmul peak measured
on this GPU (trl_anchor.matmul_peak); matmul params = all parameters less the embedding lookup, the lm head
counted once (tied or not). LoRA runs report the same full-fine-tune formula, labelled by "mfu_formula".
Each run is a fresh process printing one `RESULT {json}` line; a markdown table of vftrain/TRL ratios follows,
printed and written to --out.

usage: python benchmarks/throughput.py --arch qwen0.5b qwen1.5b --steps 30 --warmup 5 --trl
       python benchmarks/throughput.py --lora --arch qwen7b --seq 4096 --gc
       python benchmarks/throughput.py --tiny      # CPU smoke test of this script (2 layers, 64 wide, 3 steps)
Several GPUs: run one measuring process per GPU under torchrun, e.g. (benchmarks/scale.sh)
       torchrun --nproc_per_node 2 benchmarks/throughput.py --child qwen1.5b --ga 4 --engine fsdp ...
"""
import argparse
import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root: vftrain need not be installed on the GPU machine
from memory_points import cap_card, memory_estimate  # noqa: E402
from step_probes import Breakdown, host_profile, python_profile, sync, sync_report  # noqa: E402
from trl_anchor import ARCHS, MIXES, VOCAB, make_rows, matmul_peak  # noqa: E402  (benchmarks/ is sys.path[0])

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)
TINY_VOCAB, TINY_ROWS, TINY_LEN = 1000, 64, 128


def chain_rows(n, k=1000, p_follow=0.9):
    """make_rows' lengths and loss masks with learnable ids, for loss-curve comparisons: each of k token ids is
    followed by its fixed successor with probability p_follow (else by a random id), so the loss falls from
    ln(vocab) ~ 11.9 towards the chain's entropy (~1.0 nats) instead of staying flat on random ids."""
    import numpy as np

    rng = np.random.default_rng(1)
    successor = rng.permutation(k)
    out = []
    for r in make_rows(n):
        length = len(r["input_ids"])
        follow, noise = rng.random(length) < p_follow, rng.integers(0, k, size=length)
        ids = [int(noise[0])]
        for i in range(1, length):
            ids.append(int(successor[ids[-1]]) if follow[i] else int(noise[i]))
        out.append({"input_ids": [t + 100 for t in ids], "completion_mask": r["completion_mask"]})
    return out


# DeepSpeed ZeRO-3 with the Trainer's own AdamW ("auto" values are filled in by transformers from SFTConfig).
ZERO3 = os.path.join(os.path.dirname(HERE), "examples", "ds_zero3.json")


def tiny_rows(n):
    """make_rows cut down to at most TINY_LEN tokens (<= 48 of prompt) with ids inside the tiny vocabulary."""
    out = []
    for r in make_rows(n):
        mask = r["completion_mask"]
        p = min(mask.index(1), 48)
        c = min(len(mask) - mask.index(1), TINY_LEN - p)
        out.append({"input_ids": [t % (TINY_VOCAB - 100) + 100 for t in r["input_ids"][:p + c]],
                    "completion_mask": [0] * p + [1] * c})
    return out


class Meter:
    """Device-side counters of the timed micro-batches (one host sync at each end of the window)."""

    def __init__(self, warmup):
        self.warmup, self.t0, self.t1, self.micro_batches, self.real = warmup, None, None, 0, 0
        self.trained = self.attn_sq = 0  # tensors once counting starts
        self.max_tokens = 0  # the largest micro-batch seen (padded: rows x longest), from shapes on the host

    def see(self, step, inputs):
        parts = inputs.get("micro_batches") or [inputs]  # a slot split by micro_batch_tokens: each part is a forward
        self.max_tokens = max([self.max_tokens] + [p["input_ids"].numel() for p in parts])
        if step < self.warmup:
            return
        if self.t0 is None:
            sync()
            self.t0 = time.perf_counter()
        for part in parts:
            self._count(part)

    def last_step_end(self, state) -> None:
        """The window ends with the last step (synced once), not when `train()` returns: what runs after it
        (the curves' plot at train end, ~0.3-0.5 s with matplotlib's import) is no step's time, and counted over
        5-8 timed steps it made a 0.3 s step look ~20% slower."""
        if state.global_step == state.max_steps:
            sync()
            self.t1 = time.perf_counter()

    def _count(self, inputs):
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2:  # padded rows
            lens = mask.sum(-1)
            self.real += mask.sum()
            self.attn_sq += (lens * lens).sum()
        else:  # packed [1, T]; a row of n tokens has positions 0..n-1 and sum(2p + 1) = n^2
            self.real += inputs["input_ids"].numel()
            self.attn_sq += (2 * inputs["position_ids"] + 1).sum()
        self.trained += (inputs["labels"] != -100).sum()
        self.micro_batches += 1


def measure(args):
    """One vftrain run in this process; returns the RESULT dict and the trainer."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import (AttentionInterface, AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast,
                              TrainerCallback)

    import vftrain as vf
    from vftrain.lora import adapter_dtype
    from vftrain.memory import uses_liger
    from vftrain.models import empty_from_config

    cuda = torch.cuda.is_available() and not args.tiny
    shape, vocab = (TINY, TINY_VOCAB) if args.tiny else (ARCHS[args.child], VOCAB)
    rows = tiny_rows(TINY_ROWS) if args.tiny else chain_rows(6000) if args.task == "chain" else \
        make_rows(6000, mix=args.mix)
    mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
    mbs = args.mbs or max(1, round(args.seq / mean_len))
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "loss_mask": r["completion_mask"]} for r in rows])
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1},
                                                                              unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<eos>")

    cfg = AutoConfig.for_model("qwen2", vocab_size=vocab, max_position_embeddings=32768, rope_theta=1e6,
                               rms_norm_eps=1e-6, **shape)
    # Names vftrain registers itself (e.g. "varlen") are unknown to transformers until the trainer sets them.
    build_attn = args.attn if args.attn in AttentionInterface() or args.attn == "eager" else "sdpa"
    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: one process per GPU, data parallel
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    build = dict(dtype=torch.bfloat16 if cuda and not args.fp32_weights else torch.float32,
                 attn_implementation=build_attn)
    if args.engine == "fsdp" and int(os.environ.get("RANK", "0")) > 0:
        # As SFTTrainer does for a hub name under FSDP: rank 0 alone holds the weights and sends the shards.
        model = empty_from_config(cfg, **build)
    else:
        with device:  # a 7B random init on the CPU alone takes minutes
            model = AutoModelForCausalLM.from_config(cfg, **build)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    n_matmul = n_params - vocab * d + (vocab * d if cfg.tie_word_embeddings else 0)
    meter = Meter(args.warmup)

    class Measured(vf.SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            meter.see(self.state.global_step, inputs)  # before compute_loss pops the labels
            return super().training_step(model, inputs, num_items_in_batch)

    if args.save_at:  # seconds spent in each part of a checkpoint's save and a resume's load, per process
        for name in ("_save_checkpoint", "save_model", "_save_optimizer_and_scheduler", "_load_from_checkpoint",
                     "_load_optimizer_and_scheduler"):
            setattr(Measured, name, checkpoint_timer(name, getattr(vf.SFTTrainer, name)))

    engine = {"ddp": {}, "fsdp": {"fsdp": True}, "zero3": {"deepspeed": ZERO3}}[args.engine]
    # --default measures what a user gets: every speed and precision field at SFTConfig's default.
    speed = {} if args.default else dict(
        attn_implementation=args.attn, use_liger=args.vf_liger, torch_compile=args.compile,
        lean_mlp=not args.no_lean_mlp, master_weights=not args.no_master, dataloader_num_workers=2)
    if args.master_weights:  # also with --default: the one field changed
        speed["master_weights"] = {"true": True, "false": False}.get(args.master_weights, args.master_weights)
    if args.micro_batch_tokens:
        speed["micro_batch_tokens"] = args.micro_batch_tokens
    if args.compile_layers:  # also with --default
        speed["compile_layers"] = args.compile_layers == "true"
    if args.lean_mlp or args.no_lean_mlp:  # also with --default
        speed["lean_mlp"] = bool(args.lean_mlp)
    if args.blocking_copies:  # the loader's copies to the GPU as before vftrain made them non-blocking
        speed["accelerator_config"] = {"non_blocking": False}
    output_dir = args.metrics_dir
    if output_dir is None:  # a folder of its own, removed at exit: a run's metrics left there would refuse the next
        output_dir = tempfile.mkdtemp(prefix="vftrain_bench_")
        atexit.register(shutil.rmtree, output_dir, ignore_errors=True)
    config = vf.SFTConfig(
        output_dir=output_dir, max_steps=args.steps,
        batch_size=args.batch or mbs * world * args.ga,
        # --batch with a budget and no --mbs: micro_batch_size left to vftrain (one slot per process, filled forwards)
        micro_batch_size=None if args.batch and args.micro_batch_tokens and not args.mbs else mbs, **engine,
        max_seq_len=max(args.seq, MIXES[args.mix]["max_len"]), bf16=None if args.default else cuda, learning_rate=args.lr, logging_steps=1 if args.metrics_dir
        else 10, save_strategy="steps" if args.save_steps or args.save_at else "no",
        save_steps=args.save_at or args.save_steps or 500,
        report_to="none", disable_tqdm=True, packing=True, seed=0,
        use_lora=args.lora, **speed,
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"every_n_layers": args.gc_every}}
           if args.gc else {}))  # passing False warns on transformers >= 5.2x
    if args.merge:  # a merge reloads the base model from disk: give the random one a folder (one per process)
        base = f"/tmp/vftrain_bench_base_{os.environ.get('RANK', '0')}"
        model.save_pretrained(base)
        tok.save_pretrained(base)
        model.name_or_path = model.config.name_or_path = base
    if cuda and args.card_gib:
        cap_card(args.card_gib, device)
    if args.lora_float32:  # this benchmark process only
        import vftrain.trainer

        vftrain.trainer.adapters_in_base_dtype = lambda model: None
    trainer = Measured(model=model, processing_class=tok, train_dataset=ds, args=config)
    if args.save_at:
        class SaveOnlyAt(TrainerCallback):  # save_steps = N alone would also save at N's multiples
            def on_step_end(self, _args, state, control, **kwargs):
                control.should_save = control.should_save and state.global_step == args.save_at

        trainer.add_callback(SaveOnlyAt())
    class EndOfWindow(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            meter.last_step_end(state)

    trainer.add_callback(EndOfWindow())
    if args.breakdown:
        breakdown = Breakdown(trainer, meter)
    if args.memory_points and cuda:  # after Breakdown: the probes wrap its timers
        from memory_points import MemoryPoints

        points = MemoryPoints(trainer)
    if args.profile:
        trainer.add_callback(host_profile(args.warmup, args.profile))
    if args.sync_debug:
        trainer.add_callback(sync_report(args.warmup, args.sync_debug))
    if args.pyprofile:
        trainer.add_callback(python_profile(args.warmup, args.pyprofile))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train(resume_from_checkpoint=args.resume)
    sync()
    if meter.t0 is None:
        raise SystemExit(f"no step was timed: --steps {args.steps} must exceed --warmup {args.warmup}")
    dt = (meter.t1 or time.perf_counter()) - meter.t0
    merged = trainer.save_merged() if args.merge else None  # every process: sharded adapters are gathered
    real, trained, attn_sq = int(meter.real), int(meter.trained), int(meter.attn_sq)
    out = dict(framework="vftrain", arch="tiny" if args.tiny else args.child, engine=args.engine, task=args.task,
               mix=args.mix, default=args.default, fp32_weights=args.fp32_weights,
               master_weights=config.master_weights, lr=args.lr, lora=args.lora,
               adapter_dtype=str(adapter_dtype(trainer.model)).replace("torch.", "") if args.lora else None,
               attn=trainer.accelerator.unwrap_model(trainer.model).config._attn_implementation, gc=args.gc,
               liger=uses_liger(trainer.model), compile=config.torch_compile, compile_layers=config.compile_layers, lean_mlp=config.lean_mlp, ga=args.ga,
               mbs=config.micro_batch_size, batch=config.batch_size, forwards_per_step=round(meter.micro_batches / max(
                   args.steps - args.warmup, 1), 2), seq=args.seq, gpu=torch.cuda.get_device_name() if cuda
               else "cpu", steps_timed=args.steps - args.warmup, seconds=round(dt, 3),
               tokens_per_micro_batch=round(real / max(meter.micro_batches, 1)),
               real_tok_s=round(real / dt), trained_tok_s=round(trained / dt),
               params_m=round(n_params / 1e6, 2), trainable_m=round(trainable / 1e6, 2),
               gradient_checkpointing=bool(config.gradient_checkpointing),
               max_tokens_per_micro_batch=meter.max_tokens, **memory_estimate(trainer, meter.max_tokens))
    if merged:
        plain = AutoModelForCausalLM.from_pretrained(merged)
        out.update(merged=merged, merged_params_m=round(sum(p.numel() for p in plain.parameters()) / 1e6, 2),
                   merged_finite=all(bool(torch.isfinite(p).all()) for p in plain.parameters()))
    if args.memory_points and cuda:
        out["memory_points_gib"] = points.report()
    if args.breakdown:
        out["breakdown_ms_per_step"] = breakdown.report(dt)
        if world > 1 and cuda:
            out["communication"] = communication(args.engine, n_params, args.ga, dt * 1e3 / out["steps_timed"])
    if cuda:
        peak = matmul_peak()
        flops = 6 * n_matmul * real + 6 * n_layers * d * attn_sq
        out.update(mfu=round(flops / dt / peak, 4), matmul_peak_tflops=round(peak / 1e12),
                   mfu_formula="6N full-FT formula (LoRA does less work)" if args.lora else "6N",
                   peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        if world > 1:  # every process's peak (rank 0 also built the whole model before sharding it)
            peaks = [None] * world
            torch.distributed.all_gather_object(peaks, out["peak_mem_gib"])
            out["peak_mem_gib_per_rank"] = peaks
    return out, trainer


CHECKPOINT_SECONDS = {}


def checkpoint_timer(name, fn):
    """`fn` timed into CHECKPOINT_SECONDS[name] (host clock: the saves and loads are synchronous), and printed at
    once, so that a run cut short by its time limit still tells how far its save or load got."""
    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        out = fn(self, *args, **kwargs)
        sync()
        CHECKPOINT_SECONDS[name] = round(CHECKPOINT_SECONDS.get(name, 0) + time.perf_counter() - t, 1)
        print(f"CKPT rank {os.environ.get('RANK', '0')} {name} {CHECKPOINT_SECONDS[name]}s", flush=True)
        return out

    return timed


def save_and_load(trainer, folder: str) -> dict:
    """Save the trained model (every process helps gather the sharded weights), then load the folder with
    transformers on the main process: the hand-off a checkpoint must allow."""
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    trainer.save_model(folder)
    out = {"save_s": round(time.perf_counter() - t, 1)}
    if trainer.args.should_save:
        t = time.perf_counter()
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        out.update(load_s=round(time.perf_counter() - t, 1), dtype=str(plain.dtype),
                   params_m=round(sum(p.numel() for p in plain.parameters()) / 1e6, 2),
                   finite=all(bool(torch.isfinite(p).all()) for p in plain.parameters()),
                   files=sorted(os.listdir(folder)))
    return out


def communication(engine: str, n_params: int, ga: int, step_ms: float) -> dict:
    """Bytes each GPU receives per optimizer step and what they cost at the all-gather / reduce-scatter bandwidth
    measured here (one layer-sized bf16 tensor). FSDP2 gathers the bf16 weights for the forward and again for the
    backward (reshard_after_forward) of every micro-batch and reduce-scatters the bf16 gradients (accelerate's
    reduce dtype) once per step; activation checkpointing recomputes inside the backward's gather. DDP all-reduces
    the gradients. The time overlaps compute, so this bounds the exposed communication from above."""
    import torch.distributed as dist

    world = dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    mine = torch.randn(64 * 2**20, device=dev).to(torch.bfloat16)  # 128 MiB per rank
    chunk = torch.empty(world * mine.numel(), device=dev, dtype=torch.bfloat16)
    rates = {}
    for name, op in (("all_gather", lambda: dist.all_gather_into_tensor(chunk, mine)),
                     ("reduce_scatter", lambda: dist.reduce_scatter_tensor(mine, chunk))):
        for _ in range(3):
            op()
        sync()
        t = time.perf_counter()
        for _ in range(20):
            op()
        sync()
        # bytes received per rank per call: (world - 1) shards of 128 MiB
        rates[name] = (world - 1) * mine.numel() * 2 * 20 / (time.perf_counter() - t)
    share = (world - 1) / world * n_params * 2  # one bf16 copy of the model, less this rank's own shard
    if engine == "fsdp":
        gathered, reduced = 2 * ga * share, share
        ms = 1e3 * (gathered / rates["all_gather"] + reduced / rates["reduce_scatter"])
    else:  # an all-reduce = reduce-scatter + all-gather of the gradients
        gathered = reduced = share
        ms = 1e3 * (share / rates["all_gather"] + share / rates["reduce_scatter"])
    return {"gb_gathered_per_step": round(gathered / 1e9, 1), "gb_reduce_scattered_per_step": round(reduced / 1e9, 1),
            "all_gather_gb_s": round(rates["all_gather"] / 1e9), "reduce_scatter_gb_s": round(rates["reduce_scatter"] / 1e9),
            "ms_per_step_if_not_overlapped": round(ms, 1), "share_of_step": round(ms / step_ms, 3)}


def run(cmd):
    """Run a measuring process, echo its output, return its RESULT dict (or an error dict)."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    result, last = None, ""
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            sys.stdout.write(line)
            last = line.strip() or last
    rc = proc.wait()
    return result if rc == 0 and result else {"error": f"exit {rc}: {last[-200:]}"}


def trl_command(args, arch):
    """The anchor's command line, or a string saying why TRL is skipped."""
    if args.tiny:
        return "skipped: --tiny runs on CPU (the anchor needs CUDA)"
    if args.lora:
        return "skipped: trl_anchor.py has no LoRA mode"
    if importlib.util.find_spec("trl") is None:
        return "skipped: trl is not importable"
    k = trl_sequences(args)
    cmd = [sys.executable, os.path.join(HERE, "trl_anchor.py"), "trl_packed", arch, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--mix", args.mix, "--packed-seqs", str(k),
           "--attn", args.attn if args.attn in ("sdpa", "eager", "flex_attention") else "sdpa"]
    if importlib.util.find_spec("liger_kernel") is not None:
        cmd.append("--liger")
    return cmd + (["--gc"] if args.gc else [])


def trl_sequences(args) -> int:
    """TRL's micro-batch: this many packed sequences of the mix's longest row, about --seq tokens in all."""
    return max(1, args.seq // MIXES[args.mix]["max_len"])


def fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{x:.1%}" if pct else f"{x:,}"


def table(args, pairs):
    gpu = next((r["gpu"] for pair in pairs for r in pair if isinstance(r, dict) and r.get("gpu")), "?")
    tpm = ", ".join(str(r["tokens_per_micro_batch"]) for r, _ in pairs if "tokens_per_micro_batch" in r) or "?"
    lines = [f"vftrain vs TRL SFT throughput on {gpu}: {args.steps} steps ({args.warmup} warmup), "
             f"{args.mix} mix, vftrain {tpm} real tokens per micro-batch (TRL: {trl_sequences(args)} x "
             f"{MIXES[args.mix]['max_len']} packed), "
             + ("vftrain at SFTConfig's defaults" if args.default else
                f"attn={args.attn}, lora={args.lora}, gc={args.gc}, vftrain liger={args.vf_liger}, "
                f"compile={args.compile}"), "",
             "| arch | vftrain real tok/s | TRL real tok/s | ratio | vftrain trained tok/s | TRL trained tok/s "
             "| ratio | vftrain MFU | TRL MFU | peak GiB vftrain / TRL |", "|" + "---|" * 10]
    for vf_res, trl_res in pairs:
        arch = vf_res.get("arch", "?")
        if "error" in vf_res:
            lines.append(f"| {arch} | failed: {vf_res['error']} |" + " |" * 8)
            continue
        trl_ok = isinstance(trl_res, dict) and "error" not in trl_res
        t = trl_res if trl_ok else {}

        def ratio(key):
            return f"{vf_res[key] / t[key]:.2f}x" if trl_ok and t.get(key) else "-"

        lines.append(f"| {arch} | {fmt(vf_res['real_tok_s'])} | {fmt(t.get('real_tok_s'))} | {ratio('real_tok_s')} "
                     f"| {fmt(vf_res['trained_tok_s'])} | {fmt(t.get('trained_tok_s'))} | {ratio('trained_tok_s')} "
                     f"| {fmt(vf_res.get('mfu'), True)} | {fmt(t.get('mfu'), True)} "
                     f"| {vf_res.get('peak_mem_gib', '-')} / {t.get('peak_mem_gib', '-')} |")
    notes = sorted({f"TRL {r}" if isinstance(r, str) else f"TRL failed: {r['error']}"
                    for _, r in pairs if isinstance(r, str) or "error" in r})
    trl_attn = {r.get("attn") for _, r in pairs if isinstance(r, dict) and "attn" in r}
    if trl_attn and trl_attn != {args.attn}:
        notes.append(f"TRL ran with attn={', '.join(sorted(trl_attn))} (the anchor knows no {args.attn!r}).")
    if args.lora:
        notes.append("LoRA MFU uses the full fine-tune 6N formula (frozen weights get no weight gradient).")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["qwen0.5b"], choices=sorted(ARCHS))
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps (one micro-batch each)")
    ap.add_argument("--warmup", type=int, default=5, help="steps not timed")
    ap.add_argument("--trl", action="store_true", help="also run trl_anchor.py trl_packed ARCH --liger")
    ap.add_argument("--no-vftrain", action="store_true", help="run only TRL (with --trl)")
    ap.add_argument("--lora", action="store_true", help="vftrain trains LoRA adapters (use_lora)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per micro-batch to aim at (and max_seq_len)")
    ap.add_argument("--mbs", type=int, default=None, help="vftrain rows per micro-batch (default: --seq / mean "
                    "row length, so both trainers see about the same tokens per micro-batch)")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, varlen, flex_attention, ...")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing (both trainers)")
    ap.add_argument("--gc-every", type=int, default=1, help="with --gc: checkpoint every N-th decoder layer only "
                    "(gradient_checkpointing_kwargs every_n_layers)")
    ap.add_argument("--save-final", default=None, help="after training, save the model to this folder (every "
                    "process) and load it with transformers' from_pretrained (rank 0)")
    ap.add_argument("--vf-liger", action="store_true", help="patch vftrain's model with liger-kernel as well")
    ap.add_argument("--compile", action="store_true", help="vftrain: torch_compile = true")
    ap.add_argument("--compile-layers", default=None, choices=("true", "false"), help="vftrain: compile_layers "
                    "(also with --default; unset: vftrain's default)")
    ap.add_argument("--no-lean-mlp", action="store_true", help="vftrain: lean_mlp = false (also with --default)")
    ap.add_argument("--lean-mlp", action="store_true", help="vftrain: lean_mlp = true (also with --default)")
    ap.add_argument("--card-gib", type=float, default=0, help="vftrain on CUDA: act as a GPU of this many GiB "
                    "(allocator cap, and the size vftrain's memory planning sees), e.g. 79.2 for an 80 GB H100")
    ap.add_argument("--ga", type=int, default=1, help="vftrain micro-batches per optimizer step and process")
    ap.add_argument("--engine", default="ddp", choices=("ddp", "fsdp", "zero3"), help="under torchrun: data "
                    "parallel, FSDP2 (fsdp = true) or DeepSpeed ZeRO-3 (ZERO3 above)")
    ap.add_argument("--task", default="random", choices=("random", "chain"), help="row ids: random (throughput) or "
                    "a learnable chain (chain_rows, for loss curves)")
    ap.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    ap.add_argument("--fp32-weights", action="store_true", help="float32 weights with bf16 autocast instead of "
                    "bf16 weights")
    ap.add_argument("--no-master", action="store_true", help="master_weights = false: pure bf16 AdamW")
    ap.add_argument("--master-weights", default=None, choices=("true", "false", "kahan", "kahan-bf16"),
                    help="master_weights = this (also with --default)")
    ap.add_argument("--batch", type=int, default=0, help="rows per optimizer step, all processes (default: --mbs x "
                    "processes x --ga); with --micro-batch-tokens and no --mbs, micro_batch_size is left unset")
    ap.add_argument("--micro-batch-tokens", type=int, default=0, help="micro_batch_tokens (also with --default; "
                    "bounds the memory estimate's tokens per micro-batch)")
    ap.add_argument("--metrics-dir", default=None, help="output_dir, with a loss line every step in its "
                    "metrics.jsonl (for loss-curve comparisons)")
    ap.add_argument("--lora-float32", action="store_true", help="with --lora: peft's float32 adapters on the bf16 "
                    "model (vftrain before it kept them in bf16, lora.adapters_in_base_dtype), to measure the change")
    ap.add_argument("--merge", action="store_true", help="with --lora: write the merged model after training and "
                    "load it with transformers")
    ap.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    ap.add_argument("--resume", default=None, help="resume from this checkpoint folder")
    ap.add_argument("--save-at", type=int, default=0, help="save one checkpoint, at this step, and print a CKPT "
                    "line per process: seconds in each part of the save (and of a --resume's load)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 2-layer 64-wide model, vocab 1000, "
                    "64 rows of <= 128 tokens, 3 steps, fp32, no MFU or peak memory")
    ap.add_argument("--out", default=None, help="markdown table path (default benchmarks/last_run.md; "
                    "/tmp/vftrain_tiny_run.md with --tiny, so a smoke test never overwrites real numbers)")
    ap.add_argument("--mix", default="standard", choices=sorted(MIXES), help="row lengths: standard (prompts ~180, "
                    "completions ~260, rows <= 2048) or long (prompts ~900, completions ~120, rows <= 4096)")
    ap.add_argument("--default", action="store_true", help="vftrain at SFTConfig's defaults (attention, liger, "
                    "compile, lean_mlp, master weights, bf16); --attn/--vf-liger/--compile/... are ignored")
    ap.add_argument("--breakdown", action="store_true", help="also split each timed step's time into forward+backward, "
                    "the fused head's forward, grad clipping, the optimizer step and the rest (host work, idle)")
    ap.add_argument("--memory-points", action="store_true", help="per forward: memory at its end and the slot's peak "
                    "(benchmarks/memory_points.py; a host sync per forward)")
    ap.add_argument("--profile", type=int, default=0, help="profile N steps after the warm-up (torch.profiler): "
                    "host time per op, GPU busy time per step")
    ap.add_argument("--blocking-copies", action="store_true", help="copy micro-batches to the GPU with blocking "
                    "copies (accelerator_config.non_blocking = false; vftrain's default before session 5)")
    ap.add_argument("--pyprofile", type=int, default=0, help="cProfile N steps after the warm-up (host Python time "
                    "by function)")
    ap.add_argument("--sync-debug", type=int, default=0, help="list the host-device syncs of N steps after the "
                    "warm-up (torch.cuda.set_sync_debug_mode)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: measure one arch in-process
    args = ap.parse_args()
    if args.tiny:
        args.steps, args.warmup, args.seq, args.mbs = 3, 1, TINY_LEN, args.mbs or (None if args.batch else 4)
        args.arch = ["qwen0.5b"]  # only names the run; the tiny shape is used

    if args.child:
        result, trainer = measure(args)
        main_process = int(os.environ.get("RANK", "0")) == 0
        if main_process:  # under torchrun: rank 0's share (tokens are per rank)
            result["processes"] = int(os.environ.get("WORLD_SIZE", "1"))
            print("RESULT " + json.dumps(result), flush=True)
        if CHECKPOINT_SECONDS:
            print(f"CKPT rank {os.environ.get('RANK', '0')} " + json.dumps(CHECKPOINT_SECONDS), flush=True)
        if args.save_final:  # after the RESULT line, so a save that runs out of time keeps the measurement
            saved = save_and_load(trainer, args.save_final)
            if main_process:
                print("SAVED " + json.dumps(saved), flush=True)
        if torch.distributed.is_initialized():
            # The other ranks wait for rank 0's load; one that exits first tears down its process group under
            # a peer still using it (a 7B save: rank 1 died with SIGSEGV, and torchrun stopped rank 0 mid-write).
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return

    pairs = []
    for arch in args.arch:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", arch, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--seq", str(args.seq), "--attn", args.attn, "--mix", args.mix]
        cmd += ["--mbs", str(args.mbs)] if args.mbs else []
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--master-weights", args.master_weights] if args.master_weights else []
        cmd += ["--compile-layers", args.compile_layers] if args.compile_layers else []
        cmd += ["--micro-batch-tokens", str(args.micro_batch_tokens)] if args.micro_batch_tokens else []
        cmd += ["--card-gib", str(args.card_gib)] if args.card_gib else []
        cmd += ["--ga", str(args.ga), "--gc-every", str(args.gc_every), "--profile", str(args.profile),
                "--sync-debug", str(args.sync_debug), "--pyprofile", str(args.pyprofile)]
        cmd += [f"--{f.replace('_', '-')}" for f in ("lora", "gc", "vf_liger", "compile", "no_lean_mlp", "lean_mlp", "tiny",
                                                     "default", "breakdown", "blocking_copies", "lora_float32",
                                                     "memory_points")
                if getattr(args, f)]
        vf_res = {"framework": "vftrain", "arch": arch, "error": "not run"}
        if not args.no_vftrain:
            vf_res = {"framework": "vftrain", "arch": arch, **run(cmd)}
            print("RESULT " + json.dumps(vf_res), flush=True)
        trl_res = "not run (pass --trl)"
        if args.trl:
            trl_res = trl_command(args, arch)
            if not isinstance(trl_res, str):
                trl_res = {"framework": "trl", "arch": arch, **run(trl_res)}
                print("RESULT " + json.dumps(trl_res), flush=True)
        pairs.append((vf_res, trl_res))

    text = table(args, pairs)
    print("\n" + text)
    out = args.out or ("/tmp/vftrain_tiny_run.md" if args.tiny else os.path.join(HERE, "last_run.md"))
    with open(out, "w") as fh:
        fh.write(text + "\n")
    print(f"\nwrote {out}")
    ran = [v for v, _ in pairs if not args.no_vftrain] + [t for _, t in pairs if isinstance(t, dict)]
    if any("error" in r for r in ran):  # a run that failed, not one left out (--no-vftrain)
        sys.exit(1)


if __name__ == "__main__":
    main()
