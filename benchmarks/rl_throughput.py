"""One RL step on one GPU: vftrain's RLTrainer against TRL's GRPOTrainer, split into generate / score / train.

What runs, for each framework in its own process (the same inputs for all):
- a random-weight Qwen2.5-shaped model (trl_anchor.ARCHS, bf16, built on the GPU) and an offline tokenizer whose
  151,936-id vocabulary matches the model: a `tokenizers` WordLevel vocabulary ("<|endoftext|>", "<|im_start|>",
  "<|im_end|>", role names, then words w5, w6, ...), a whitespace pre-tokenizer and a ChatML-like chat template,
  so every sampled id decodes to a word;
- prompts: one user message of random words, rendered by the template to exactly --prompt-len tokens;
- --prompts per step x --group completions of each, --new-tokens at most, temperature 1.0. A random model almost
  never samples the stop token (3 ids of 151,936), so every completion runs to --new-tokens; with --varied the
  stop token's output row is raised (rl_probes.make_stopping) so that each step samples it with probability
  --stop-prob (default 4 / --new-tokens: completions stop early, roughly geometric, mean ~ --new-tokens / 4);
- reward: the share of the completion's words ending in "7" (graded, so groups have nonzero advantages).
Runs:
- vftrain: RLTrainer at RLConfig's defaults (embedded rollouts, attn_implementation auto, master_weights unset, liger
  where installed, token-budgeted micro-batches); only batch sizes and lengths are set.
- vftrain-eager: the same, rollouts decoded without CUDA graphs (`sample(graphs=False)`: transformers' dynamic
  cache, one eager forward per token), to show what the graphs buy.
- vftrain-no-master: the same as vftrain with master_weights = false (pure bf16 AdamW, as TRL trains), to show
  what the default's master copies (or compensation) cost in memory.
- trl: GRPOConfig(use_vllm=False: transformers' generate; beta 0; its default loss, "dapo"), bf16, micro-batch 8
  rollouts, gradient accumulation up to the step's rollouts (one generate call per step, as vftrain);
  gradient_checkpointing=False (TRL defaults it to True, which only slows the train phase).

How it is measured: a callback synchronizes CUDA at the end of every optimizer step (step wall time). The rollout
phase is vftrain's `get_batch_samples` / TRL's `_generate_and_score_completions`; inside it, generate is the sampler
call (vftrain `_sample`; TRL `_generate`, which also applies the chat template), both timed on the host after a
CUDA sync; score = rollout phase - generate (decode, rewards, advantages, batching); train = step wall - rollout
phase (forward, backward, optimizer). Steps up to --warmup are not reported (CUDA graph capture, Triton
compilation); each figure is the median over the later steps. Rollout tok/s = completion tokens / generate time;
step tok/s = (prompt + completion tokens) / step wall. Memory (GPU): torch.cuda.memory_allocated at the phase
boundaries, broken down by rl_probes.Memory (weights, master copies, moments, sampler, CUDA-graph pool, train
phase); peak = the largest allocated at any time.

Modes: --lengths L... runs every run at every --arch and length (prompt = completion = L tokens) into one table with
each run's speed over TRL's at the same shape; --deadline S skips the runs that would not finish within S seconds
(estimated from the finished ones). --profile-decode times `sample` alone per --arch and --decode-rows, beside
the bandwidth floor: the bytes of weights + filled KV cache a decoding step reads over the card's copy bandwidth;
the model patched with liger-kernel where RLTrainer's defaults patch it (before this, the decode figures of
RESULTS.md were taken without liger's RMSNorm / SwiGLU kernels, which an RL run's sampler uses).

usage: python benchmarks/rl_throughput.py                      # Qwen2.5-0.5B shape, all four runs (GPU)
       python benchmarks/rl_throughput.py --runs vftrain trl --steps 6
       python benchmarks/rl_throughput.py --runs vftrain trl --arch qwen0.5b qwen1.5b --lengths 128 256 512 1024
       python benchmarks/rl_throughput.py --runs vftrain trl --varied         # completions that stop early
       python benchmarks/rl_throughput.py --profile-decode --arch qwen0.5b qwen1.5b --decode-rows 128 256
       python benchmarks/rl_throughput.py --runs vftrain --arch qwen1.5b --lengths 1024 --steps 2 --profile-train 1
       python benchmarks/rl_throughput.py --tiny [mode flags]  # CPU smoke test (2 layers, 64 wide, short lengths)
"""
import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root: vftrain need not be installed on the GPU machine
from rl_probes import (GIB, DecodeCounts, Memory, compile_decoding, copy_bandwidth, decode_bytes,  # noqa: E402
                       make_stopping, timed)
from trl_anchor import ARCHS, VOCAB  # noqa: E402  (benchmarks/ is sys.path[0])
from step_probes import host_profile  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
STOP_ID = SPECIAL.index("<|im_end|>")  # the tokenizer's eos: what both frameworks stop on
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
RUNS = ("vftrain", "trl", "vftrain-eager", "vftrain-no-master")
LENGTHS = (128, 256, 512, 1024)
STARTUP = 15  # seconds a run's process takes before its first step (H200: imports, model, trainer), for --deadline


def make_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {t: i for i, t in enumerate(SPECIAL)}
    words.update({f"w{i}": i for i in range(len(SPECIAL), vocab)})
    core = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = TEMPLATE
    return tok


def make_prompts(tok, n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """n rows {prompt: [user message], answer}: random words, rendered to exactly `length` tokens."""
    import numpy as np

    overhead = len(tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                           tokenize=False).split())
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = " ".join(f"w{i}" for i in rng.integers(len(SPECIAL), vocab, size=length - overhead))
        rows.append({"prompt": [{"role": "user", "content": words}], "answer": "w7"})
    return rows


def reward(completion: str, reference: str) -> float:
    words = completion.split()
    return sum(w.endswith("7") for w in words) / max(len(words), 1)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    """Per optimizer step: host seconds in the rollout phase, in generation, completion tokens, step wall time;
    and GPU memory at each phase boundary (`memory`)."""

    def __init__(self):
        self.steps, self.current, self.last = [], {}, None
        self.memory = Memory()

    def timed(self, key, fn, tokens=None):
        def run(*args, **kwargs):
            step = len(self.steps) + 1
            sync()
            self.memory.mark(f"step {step} {key} start")
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.current[key] = self.current.get(key, 0.0) + time.perf_counter() - start
            self.memory.mark(f"step {step} {key} end")
            if tokens is not None:
                self.current["completion_tokens"] = tokens(out)
            return out

        return run

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class StepEnd(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                sync()
                clock.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                now = time.perf_counter()
                clock.steps.append({"step": state.global_step, "wall": now - clock.last, **clock.current})
                clock.memory.mark(f"step {len(clock.steps)} end")
                clock.current, clock.last = {}, time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if clock.steps and logs:
                    logged = clock.steps[-1].setdefault("logged", {})
                    logged.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

        return StepEnd()


def build_model(args, cuda: bool, arch: str):
    """The random model (seed 0); with --varied, its stop token raised to probability --stop-prob per step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape, vocab = (TINY, args.vocab) if args.tiny else (ARCHS[arch], VOCAB)
    cfg = AutoConfig.for_model("qwen2", vocab_size=vocab, max_position_embeddings=32768, rope_theta=1e6,
                               rms_norm_eps=1e-6, **shape)
    torch.manual_seed(0)
    device = "cuda" if cuda else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    if args.varied:
        probe = torch.randint(len(SPECIAL), vocab, (4, min(args.prompt_len, 128)),
                              generator=torch.Generator().manual_seed(1)).to(device)
        make_stopping(model, STOP_ID, stop_prob(args), probe)
    return model, vocab


def label(args, arch: str) -> str:
    return f"{arch} (tiny)" if args.tiny else arch


def stop_prob(args) -> float:
    return args.stop_prob if args.stop_prob is not None else min(1.0, 4 / args.new_tokens)


def sample_kwargs(graphs: bool) -> dict:
    """`graphs=` for `sample` where it takes one (the decoder chooses by itself otherwise)."""
    from vftrain.sampling.tokens import sample

    return {"graphs": graphs} if "graphs" in inspect.signature(sample).parameters else {}


def run_vftrain(args, model, tok, rows, clock, graphs: bool, master: bool = True):
    from datasets import Dataset

    import vftrain as vf
    import vftrain.rl.trainer as rl_trainer
    from vftrain.memory import uses_liger
    from vftrain.sampling.tokens import sample

    config = vf.RLConfig(
        output_dir=tempfile.mkdtemp(prefix="vftrain_rl_bench_"), max_steps=args.steps, batch_size=args.prompts * args.group,
        rollouts_per_example=args.group, max_prompt_len=args.prompt_len, max_new_tokens=args.new_tokens,
        max_seq_len=args.prompt_len + args.new_tokens, temperature=1.0, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, master_weights=None if master else False,  # None: RLConfig's default
        micro_batch_tokens=args.micro_batch_tokens, **({"learning_rate": args.lr} if args.lr is not None else {}))
    if not graphs:
        rl_trainer.sample = lambda *a, **k: sample(*a, **k, **sample_kwargs(False))
    trainer = vf.RLTrainer(model=model, train_dataset=Dataset.from_list(rows), args=config, reward_funcs=[reward],
                           processing_class=tok)
    widths = {len(ids) for ids in trainer.prompts.ids}
    assert widths == {args.prompt_len}, f"prompt lengths {widths} != {args.prompt_len}"
    # the rollout phase: sampling (the pipeline's, started by get_batch_samples), scoring, packing
    trainer.get_batch_samples = clock.timed("rollout", trainer.get_batch_samples)
    trainer._sample = clock.timed("generate", trainer._sample,
                                  tokens=lambda out: sum(len(s.completion_ids) for s in out))
    trainer.add_callback(clock.callback())
    if args.profile_train:  # the train phase only: the callback opens after get_batch_samples, closes at step end
        trainer.add_callback(host_profile(args.warmup, args.profile_train))
    clock.memory.mark("trainer")
    trainer.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    return dict(attn=unwrapped.config._attn_implementation, liger=uses_liger(unwrapped),
                master_weights=trainer.args.master_weights, micro_batch_size=trainer.args.micro_batch_size,
                micro_batch_tokens=trainer.args.micro_batch_tokens, lean_mlp=trainer.args.lean_mlp,
                gradient_checkpointing=trainer.args.gradient_checkpointing, gradient_accumulation=trainer.args.gradient_accumulation_steps)


def run_trl(args, model, tok, rows, clock, cuda: bool):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def trl_reward(completions, answer, **kwargs):
        return [reward(c[-1]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    rollouts, micro = args.prompts * args.group, 8
    config = GRPOConfig(
        output_dir="/tmp/trl_rl_bench", max_steps=args.steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=rollouts // micro, num_generations=args.group,
        max_completion_length=args.new_tokens, temperature=1.0, beta=0.0, use_vllm=False, bf16=cuda,
        use_cpu=not cuda, gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, **({"learning_rate": args.lr} if args.lr is not None else {}))
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)
    trainer._generate_and_score_completions = clock.timed(
        "rollout", trainer._generate_and_score_completions, tokens=lambda out: int(out["completion_mask"].sum()))
    trainer._generate = clock.timed("generate", trainer._generate)
    trainer.add_callback(clock.callback())
    clock.memory.mark("trainer")
    trainer.train()
    return dict(loss_type=config.loss_type, micro_batch_size=micro, gradient_accumulation=rollouts // micro,
                generation_batch_size=config.generation_batch_size)


def profile_decode(args) -> list[dict]:
    """Where a decoding step's time goes, per --arch and --decode-rows (prompts of --prompt-len, --new-tokens
    steps): `sample` as the trainer calls it, with CUDA graphs (and without, unless --no-eager); the step time is
    (whole call - a 2-token call) / (new tokens - 2), so neither the prefill nor the first step's graph capture is
    in it; beside it the bandwidth floor.
    Then --profile-tokens steps under torch.profiler (first --decode-rows only): GPU time per step by kernel."""
    from vftrain.models import apply_liger, liger_applies
    from vftrain.sampling import tokens
    from vftrain.sampling.tokens import sample

    cuda = torch.cuda.is_available() and not args.tiny
    if args.fused_rope:  # what fusing RoPE would save: transformers' rotate-half RoPE is ~10 small kernels per layer
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        from transformers.models.qwen2 import modeling_qwen2

        modeling_qwen2.apply_rotary_pos_emb = liger_rotary_pos_emb  # this benchmark process only
    if args.compile_decode:
        compile_decoding()
    bandwidth = copy_bandwidth() if cuda else None
    if bandwidth:
        print(f"DECODE copy bandwidth {bandwidth / 1e12:.2f} TB/s (device-to-device, bytes read + written)")
    results = []
    for arch in args.arch:
        model, vocab = build_model(args, cuda, arch)
        liger = liger_applies(model)
        if liger:  # as RLTrainer's default loading patches the model it trains and samples from
            apply_liger(model)
        for i, rows in enumerate(args.decode_rows):
            gen = torch.Generator().manual_seed(0)
            prompts = [torch.randint(len(SPECIAL), vocab, (args.prompt_len,), generator=gen).tolist()
                       for _ in range(max(1, rows // args.group))]
            kw = dict(n=args.group, temperature=1.0, top_p=1.0, stop_ids={STOP_ID}, pad_id=0, seed=0)
            warmup = timed(sample, model, prompts, max_new_tokens=8, **kw)  # graph capture (and compilation)
            print(f"DECODE {label(args, arch)} rows={rows}: first call {warmup:.1f} s (captures"
                  f"{', compilation' if args.compile_decode else ''})", flush=True)
            weights, kv = decode_bytes(model, len(prompts) * args.group, args.prompt_len, args.new_tokens)
            floor_ms = (weights + kv) / bandwidth * 1e3 if bandwidth else None
            for graphs in (True,) if args.no_eager else (True, False):
                extra = sample_kwargs(graphs)
                # prefill + the first decoding step (graph warm-up and capture): left out of the step time. Each
                # timed twice, the faster kept: the first configuration of a process measured 6.4 ms where a
                # later, larger one took 5.2 (first-shape costs: kernel selection, cuDNN plans).
                prefill = min(timed(sample, model, prompts, max_new_tokens=2, **kw, **extra) for _ in range(2))
                whole = min(timed(sample, model, prompts, max_new_tokens=args.new_tokens, **kw, **extra)
                            for _ in range(2))
                step_ms = (whole - prefill) / max(args.new_tokens - 2, 1) * 1e3
                out = dict(arch=label(args, arch), rows=len(prompts) * args.group, graphs=graphs,
                           capture_failed=tokens._Forward.warned,  # decoding fell back to eager (logged once)
                           liger=liger, fused_rope=args.fused_rope, compiled=args.compile_decode,
                           first_call_s=round(warmup, 1),
                           prompt_len=args.prompt_len, new_tokens=args.new_tokens, step_ms=round(step_ms, 3),
                           prefill_s=round(prefill, 3), weights_gb=round(weights / 1e9, 3), kv_gb=round(kv / 1e9, 3),
                           floor_ms=round(floor_ms, 3) if floor_ms else None,
                           x_floor=round(step_ms / floor_ms, 1) if floor_ms else None)
                floor = (f"floor {floor_ms:.2f} ms ({out['weights_gb']} GB weights + {out['kv_gb']} GB filled KV "
                         f"cache at {bandwidth / 1e12:.2f} TB/s): {out['x_floor']}x" if floor_ms else "floor n/a")
                print(f"DECODE {out['arch']} rows={out['rows']} graphs={graphs} (liger: {liger}, fused RoPE: "
                      f"{args.fused_rope}, compiled: {args.compile_decode}, capture failed: "
                      f"{out['capture_failed']}): {step_ms:.2f} ms per step "
                      f"(prefill + first step {prefill:.3f} s not included) | {floor}", flush=True)
                print("DECODE_RESULT " + json.dumps(out), flush=True)
                results.append(out)
            if i == 0 and args.profile_tokens:
                print_profile(model, prompts, kw, args.profile_tokens, cuda)
        del model
        if cuda:
            torch.cuda.empty_cache()
    return results


def print_profile(model, prompts, kw, steps: int, cuda: bool) -> None:
    """GPU time per decoding step by kernel: a profiled call of `steps` + 2 new tokens less one of 2 (the prefill and
    the first step's capture cancel), divided by `steps`. CPU: operator self time instead (a dry run)."""
    from torch.profiler import ProfilerActivity, profile

    from vftrain.sampling.tokens import sample

    def kernels(new_tokens: int) -> dict[str, tuple[float, int]]:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            sample(model, prompts, max_new_tokens=new_tokens, **kw)
        out = {}
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total
            if us > 0 and (not cuda or e.device_type.name == "CUDA"):
                out[e.key] = (us, e.count)
        return out

    short, long = kernels(2), kernels(steps + 2)
    per_step = {k: ((us - short.get(k, (0, 0))[0]) / steps, (n - short.get(k, (0, 0))[1]) / steps)
                for k, (us, n) in long.items()}
    rows = sorted(per_step.items(), key=lambda kv: -kv[1][0])
    total_us, total_n = sum(us for us, _ in per_step.values()), sum(n for _, n in per_step.values())
    print(f"DECODE_PROFILE {steps} steps: {total_us:.0f} us of {'GPU' if cuda else 'CPU'} time and "
          f"{total_n:.0f} kernels per step", flush=True)
    for name, (us, n) in rows[:25]:
        print(f"DECODE_PROFILE {us:8.1f} us {n:6.1f} x  {name[:100]}", flush=True)


def measure(args) -> dict:
    cuda = torch.cuda.is_available() and not args.tiny
    clock = Clock()
    model, vocab = build_model(args, cuda, args.arch[0])
    clock.memory.mark("model")
    tok = make_tokenizer(vocab)
    rows = make_prompts(tok, args.prompts * (args.steps + 1), args.prompt_len, vocab)
    if args.child == "trl":
        extra = run_trl(args, model, tok, rows, clock, cuda)
    else:
        if args.compile_decode:
            compile_decoding()
        decode = DecodeCounts()
        extra = run_vftrain(args, model, tok, rows, clock, graphs=args.child != "vftrain-eager",
                            master=args.child != "vftrain-no-master")
        extra["decode_per_step"] = decode.per_step(args.steps)  # every step's, warm-up included
        extra["compiled_decode"] = args.compile_decode
    timed_steps = [s for s in clock.steps if s["step"] > args.warmup]
    if not timed_steps:
        raise SystemExit(f"no step was timed: --steps {args.steps} must exceed --warmup {args.warmup}")

    def median(key):
        return statistics.median(s.get(key, 0.0) for s in timed_steps)

    rollout, generate, wall = median("rollout"), median("generate"), median("wall")
    completion = median("completion_tokens")
    rollouts = args.prompts * args.group
    out = dict(run=args.child, arch=label(args, args.arch[0]), gpu=torch.cuda.get_device_name() if cuda
               else "cpu", steps=args.steps, warmup=args.warmup, rollouts=rollouts, prompt_len=args.prompt_len,
               new_tokens=args.new_tokens, varied=args.varied, completion_tokens=completion,
               mean_completion=round(completion / rollouts, 1), step_s=round(wall, 3), generate_s=round(generate, 3),
               score_s=round(rollout - generate, 3), train_s=round(wall - rollout, 3),
               rollout_tok_s=round(completion / generate), step_tok_s=round((rollouts * args.prompt_len + completion)
                                                                            / wall), **extra)
    if args.varied:
        out["stop_prob"] = round(stop_prob(args), 5)
    # vftrain's own view of the same steps: its logged split, and whether the rollouts were on-policy (the
    # trainer's logprobs of the sampled tokens against the sampler's: bf16 rounding only).
    for key in ("time/generate", "time/score", "time/train", "tokens_per_second", "importance_ratio_min",
                "importance_ratio_max", "mismatch_kl", "entropy", "completion_len"):
        values = [s["logged"][key] for s in timed_steps if key in s.get("logged", {})]
        if values:
            out[f"logged {key}"] = round(statistics.median(values), 6)
    out["per_step"] = clock.steps
    if cuda:
        out["memory_gib"] = clock.memory.breakdown(len(clock.steps), sum(p.numel() for p in model.parameters()))
        out["peak_mem_gib"] = round(clock.memory.peak() / GIB, 2)
    return out


def run(cmd, timeout):
    """Run a measuring process, echo its output, return its RESULT dict (or an error dict)."""
    print("$ " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {"error": f"timed out after {timeout} s"}, output
    result, lines = None, []
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            lines.append(line)
    last = next((x for x in reversed(lines) if x.strip()), "")
    return (result if proc.returncode == 0 and result else {"error": f"exit {proc.returncode}: {last[-300:]}"},
            "\n".join(lines))


def _shape(r: dict) -> tuple:
    return r.get("arch"), r.get("prompt_len"), r.get("new_tokens")


def table(results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    first = ok[0] if ok else {}
    varied = (f", stop token sampled with probability {first['stop_prob']} per step (--varied)"
              if first.get("varied") else "")
    lines = [f"RL step on {first.get('gpu', '?')}: {first.get('rollouts', '?')} rollouts per step, median of steps "
             f"{first.get('warmup', 0) + 1}..{first.get('steps', '?')}{varied}", "",
             "| arch | prompt + new | run | step s | x TRL | generate s | score s | train s | mean completion "
             "| rollout tok/s | step tok/s | peak GiB |", "|" + "---|" * 12]
    trl = {_shape(r): r for r in ok if r["run"] == "trl"}
    for r in sorted(results, key=lambda r: (_shape(r), RUNS.index(r["run"]))):
        shape = f"| {r.get('arch', '?')} | {r.get('prompt_len', '?')} + {r.get('new_tokens', '?')} | {r['run']} |"
        if "error" in r:
            lines.append(f"{shape} {r['error']} |" + " |" * 8)
            continue
        base = trl.get(_shape(r))
        speedup = f"{base['step_s'] / r['step_s']:.2f}x" if base and r is not base else "-"
        lines.append(f"{shape} {r['step_s']} | {speedup} | {r['generate_s']} | {r['score_s']} | {r['train_s']} | "
                     f"{r['mean_completion']} | {r['rollout_tok_s']:,} | {r['step_tok_s']:,} | "
                     f"{r.get('peak_mem_gib', '-')} |")
    memory = [r for r in ok if r.get("memory_gib")]
    if memory:
        parts = list(memory[0]["memory_gib"])
        lines += ["", "GPU memory, GiB (allocated at phase boundaries; sampler and train: the last step, over the "
                  "allocated at the phase's start; graph pool: reserved by CUDA-graph private pools)", "",
                  "| arch | prompt + new | run | " + " | ".join(parts) + " |", "|" + "---|" * (3 + len(parts))]
        for r in sorted(memory, key=lambda r: (_shape(r), RUNS.index(r["run"]))):
            lines.append(f"| {r['arch']} | {r['prompt_len']} + {r['new_tokens']} | {r['run']} | "
                         + " | ".join(str(r["memory_gib"].get(p, "-")) for p in parts) + " |")
    return "\n".join(lines)


def plan(args) -> list[tuple]:
    """(arch, prompt_len, new_tokens, run) of every child, in the order they run."""
    lengths = [(n, n) for n in args.lengths] if args.lengths is not None else [(args.prompt_len, args.new_tokens)]
    return [(arch, p, c, name) for p, c in lengths for arch in args.arch for name in args.runs]


def estimate(done: list[tuple], arch: str, tokens: int, name: str) -> float:
    """Seconds a child will take: a finished child of the same arch and run (else of the same arch, else any) scaled
    by length past a start-up of STARTUP seconds (imports, model, trainer); the longest such guess."""
    for same in (lambda a, n: a == arch and n == name, lambda a, n: a == arch, lambda a, n: True):
        scaled = [STARTUP + max(wall - STARTUP, 0) * tokens / t for a, t, n, wall in done if same(a, n)]
        if scaled:
            return max(scaled)
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["qwen0.5b"], choices=sorted(ARCHS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (chat template included)")
    ap.add_argument("--new-tokens", type=int, default=256, help="max new tokens per completion")
    ap.add_argument("--lengths", nargs="*", type=int, default=None, help="sweep: every run at every --arch and "
                    f"length L (prompt = completion = L tokens); no value: {' '.join(map(str, LENGTHS))}")
    ap.add_argument("--varied", action="store_true", help="completions that stop early: the model samples its stop "
                    "token with probability --stop-prob per step")
    ap.add_argument("--stop-prob", type=float, default=None, help="with --varied (default 4 / --new-tokens)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for all runs: a run that would end later "
                    "(estimated from the finished ones) is skipped, and none gets more than what is left")
    ap.add_argument("--vocab", type=int, default=1000, help="vocabulary of the --tiny model")
    ap.add_argument("--timeout", type=int, default=240, help="seconds allowed to each run's process")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 2-layer 64-wide model, vocab --vocab, "
                    "4 prompts x 4, 24-token prompts, 8 new tokens, 3 steps")
    ap.add_argument("--out", default=None, help="where to write the markdown table and the RESULT lines (.md/.jsonl; "
                    "default benchmarks/rl_last_run, /tmp/vftrain_rl_tiny with --tiny)")
    ap.add_argument("--profile-decode", action="store_true", help="instead of the runs: time `sample` per --arch "
                    "and --decode-rows beside the bandwidth floor, and print a kernel profile of --profile-tokens "
                    "decoding steps")
    ap.add_argument("--decode-rows", nargs="+", type=int, default=[128], help="rows decoded together "
                    "(--profile-decode; --group completions of rows / --group prompts)")
    ap.add_argument("--no-eager", action="store_true", help="--profile-decode: time the CUDA-graph decoder only")
    ap.add_argument("--fused-rope", action="store_true", help="--profile-decode: liger-kernel's RoPE kernel in place "
                    "of transformers' apply_rotary_pos_emb (swapped in this benchmark process only; Triton: a GPU, or "
                    "TRITON_INTERPRET=1), to measure what fusing RoPE would save")
    ap.add_argument("--compile-decode", action="store_true", help="each decoding step's forward through "
                    "torch.compile inside the CUDA graph (this benchmark process only; --profile-decode and vftrain's "
                    "RL runs), to measure it")
    ap.add_argument("--profile-tokens", type=int, default=32, help="decoding steps under the profiler (0: none)")
    ap.add_argument("--micro-batch-tokens", type=int, default=None, help="vftrain runs: RLConfig.micro_batch_tokens "
                    "(default unset: RLConfig's token budget)")
    ap.add_argument("--profile-train", type=int, default=0, help="vftrain runs: torch.profiler over this many train "
                    "phases after --warmup (host and GPU op tables, step_probes.host_profile); slows the steps it covers")
    ap.add_argument("--lr", type=float, default=None, help="learning rate of both frameworks (default: each "
                    "one's own, vftrain 2e-6, TRL 1e-6). With --varied the policies' completion lengths part after the "
                    "first update (RESULTS.md, session 30); a tiny rate (1e-12) keeps them the model's for a "
                    "like-for-like step time")
    ap.add_argument("--log-dir", default=None, help="also write each run's full output to DIR/rl_RUN.log")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one run in this process
    args = ap.parse_args()
    if args.lengths == []:
        args.lengths = list(LENGTHS)
    if args.tiny and not args.child:  # a child takes its parent's numbers
        args.prompts, args.group, args.steps = 4, 4, 3
        if (args.prompt_len, args.new_tokens) == (256, 256):  # lengths set on the command line stay
            args.prompt_len, args.new_tokens = 24, 8
    out = args.out or ("/tmp/vftrain_rl_tiny" if args.tiny else os.path.join(HERE, "rl_last_run"))
    if args.profile_decode:
        results = profile_decode(args)
        with open(out + "_decode.jsonl", "w") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in results))
        return
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    results, done, begin = [], [], time.monotonic()
    for arch, prompt_len, new_tokens, name in plan(args):
        left = args.deadline - (time.monotonic() - begin) if args.deadline else args.timeout
        guess = estimate(done, arch, prompt_len + new_tokens, name)
        if args.deadline and left < max(guess, 20):
            result = {"run": name, "arch": label(args, arch), "prompt_len": prompt_len,
                      "new_tokens": new_tokens,
                      "error": f"skipped: {left:.0f} s left, about {guess:.0f} s needed"}
            print("SKIP " + json.dumps(result), flush=True)
            results.append(result)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--arch", arch, "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--prompts", str(args.prompts), "--group",
               str(args.group), "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens),
               "--vocab", str(args.vocab)] + (["--tiny"] if args.tiny else []) + (["--varied"] if args.varied else []) \
            + (["--stop-prob", str(args.stop_prob)] if args.stop_prob is not None else []) \
            + (["--micro-batch-tokens", str(args.micro_batch_tokens)] if args.micro_batch_tokens else []) \
            + (["--lr", str(args.lr)] if args.lr is not None else []) \
            + (["--profile-train", str(args.profile_train)] if args.profile_train else []) \
            + (["--compile-decode"] if args.compile_decode else [])
        start = time.monotonic()
        result, log = run(cmd, int(min(args.timeout, left)))
        done.append((arch, prompt_len + new_tokens, name, time.monotonic() - start))
        result = {"run": name, "arch": label(args, arch), "prompt_len": prompt_len,
                  "new_tokens": new_tokens, **result}
        if "error" in result:
            print(log[-3000:], flush=True)
        print("RESULT " + json.dumps({k: v for k, v in result.items() if k != "per_step"}), flush=True)
        results.append(result)
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            with open(os.path.join(args.log_dir, f"rl_{name}_{arch}_{prompt_len}_{new_tokens}.log"), "w") as fh:
                fh.write(log)
    text = table(results)
    print("\n" + text)
    with open(out + ".md", "w") as fh:
        fh.write(text + "\n")
    with open(out + ".jsonl", "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in results))
    print(f"\nwrote {out}.md and {out}.jsonl")
    if any("error" in r and not r["error"].startswith("skipped") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
