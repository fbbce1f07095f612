"""One RL step on one GPU: vftrain's RLTrainer against TRL's GRPOTrainer, split into generate / score / train.

What runs, for each framework in its own process (the same inputs for all):
- a random-weight Qwen2.5-shaped model (trl_anchor.ARCHS, bf16, built on the GPU) and an offline tokenizer whose
  151,936-id vocabulary matches the model: a `tokenizers` WordLevel vocabulary ("<|endoftext|>", "<|im_start|>",
  "<|im_end|>", role names, then words w5, w6, ...), a whitespace pre-tokenizer and a ChatML-like chat template,
  so every sampled id decodes to a word;
- prompts: one user message of random words, rendered by the template to exactly --prompt-len tokens;
- --prompts per step x --group completions of each, --new-tokens at most, temperature 1.0. A random model almost
  never samples the stop token (3 ids of 151,936), so every completion runs to --new-tokens;
- reward: the share of the completion's words ending in "7" (graded, so groups have nonzero advantages).
Runs:
- vftrain: RLTrainer at RLConfig's defaults (embedded rollouts, attn_implementation auto, master weights, liger
  where installed, micro_batch_size 8); only batch sizes and lengths are set.
- vftrain-eager: the same, rollouts decoded without CUDA graphs (`sample(graphs=False)`: transformers' dynamic
  cache, one eager forward per token), to show what the graphs buy.
- vftrain-no-master: the same as vftrain with master_weights = false (pure bf16 AdamW, as TRL trains), to show
  what the float32 master weights cost in memory.
- trl: GRPOConfig(use_vllm=False: transformers' generate; beta 0; its default loss, "dapo"), bf16, micro-batch 8
  rollouts, gradient accumulation up to the step's rollouts (one generate call per step, as vftrain);
  gradient_checkpointing=False (TRL defaults it to True, which only slows the train phase).

How it is measured: a callback synchronizes CUDA at the end of every optimizer step (step wall time). The rollout
phase is vftrain's `_make_rollouts` / TRL's `_generate_and_score_completions`; inside it, generate is the sampler
call (vftrain `_sample`; TRL `_generate`, which also applies the chat template), both timed on the host after a
CUDA sync; score = rollout phase - generate (decode, rewards, advantages, batching); train = step wall - rollout
phase (forward, backward, optimizer). Steps up to --warmup are not reported (CUDA graph capture, Triton
compilation); each figure is the median over the later steps. Rollout tok/s = completion tokens / generate time;
step tok/s = (prompt + completion tokens) / step wall.

usage: python benchmarks/rl_throughput.py                      # Qwen2.5-0.5B shape, all three runs (GPU)
       python benchmarks/rl_throughput.py --runs vftrain trl --steps 6
       python benchmarks/rl_throughput.py --tiny               # CPU smoke test (2 layers, 64 wide, short lengths)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root: vftrain need not be installed on the GPU machine
from trl_anchor import ARCHS, VOCAB  # noqa: E402  (benchmarks/ is sys.path[0])

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
RUNS = ("vftrain", "trl", "vftrain-eager", "vftrain-no-master")


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
    """Per optimizer step: host seconds in the rollout phase, in generation, completion tokens, step wall time."""

    def __init__(self):
        self.steps, self.current, self.last = [], {}, None

    def timed(self, key, fn, tokens=None):
        def run(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.current[key] = self.current.get(key, 0.0) + time.perf_counter() - start
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
                clock.current, clock.last = {}, now

            def on_log(self, args, state, control, logs=None, **kwargs):
                if clock.steps and logs:
                    logged = clock.steps[-1].setdefault("logged", {})
                    logged.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

        return StepEnd()


def build_model(args, cuda: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape, vocab = (TINY, args.vocab) if args.tiny else (ARCHS[args.arch], VOCAB)
    cfg = AutoConfig.for_model("qwen2", vocab_size=vocab, max_position_embeddings=32768, rope_theta=1e6,
                               rms_norm_eps=1e-6, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    return model, vocab


def run_vftrain(args, model, tok, rows, clock, graphs: bool, master: bool = True):
    from datasets import Dataset

    import vftrain as vf
    import vftrain.rl.trainer as rl_trainer
    from vftrain.sampling.tokens import sample

    config = vf.RLConfig(
        output_dir="/tmp/vftrain_rl_bench", max_steps=args.steps, batch_size=args.prompts * args.group,
        rollouts_per_example=args.group, max_prompt_len=args.prompt_len, max_new_tokens=args.new_tokens,
        max_seq_len=args.prompt_len + args.new_tokens, temperature=1.0, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, master_weights=master)
    if not graphs:
        rl_trainer.sample = lambda *a, **k: sample(*a, **k, graphs=False)
    trainer = vf.RLTrainer(model=model, train_dataset=Dataset.from_list(rows), args=config, reward_funcs=[reward],
                           processing_class=tok)
    widths = {len(ids) for ids in trainer.prompts.ids}
    assert widths == {args.prompt_len}, f"prompt lengths {widths} != {args.prompt_len}"
    trainer._make_rollouts = clock.timed("rollout", trainer._make_rollouts)
    trainer._sample = clock.timed("generate", trainer._sample,
                                  tokens=lambda out: sum(len(s.completion_ids) for s in out))
    trainer.add_callback(clock.callback())
    trainer.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    return dict(attn=unwrapped.config._attn_implementation, liger=trainer.args.use_liger,
                master_weights=trainer.args.master_weights, micro_batch_size=trainer.args.micro_batch_size,
                gradient_accumulation=trainer.args.gradient_accumulation_steps)


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
        disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)
    trainer._generate_and_score_completions = clock.timed(
        "rollout", trainer._generate_and_score_completions, tokens=lambda out: int(out["completion_mask"].sum()))
    trainer._generate = clock.timed("generate", trainer._generate)
    trainer.add_callback(clock.callback())
    trainer.train()
    return dict(loss_type=config.loss_type, micro_batch_size=micro, gradient_accumulation=rollouts // micro,
                generation_batch_size=config.generation_batch_size)


def profile_decode(args) -> None:
    """Where a decoding step's time goes: `sample` as the trainer calls it (--prompts x --group rows) timed whole
    with and without CUDA graphs, then --profile-tokens steps under torch.profiler: CUDA time per kernel."""
    from vftrain.sampling.tokens import sample

    cuda = torch.cuda.is_available() and not args.tiny
    model, vocab = build_model(args, cuda)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(len(SPECIAL), vocab, (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.prompts)]
    kw = dict(n=args.group, temperature=1.0, top_p=1.0, stop_ids={2}, pad_id=0, seed=0)
    sample(model, prompts, max_new_tokens=8, **kw)  # warm-up
    for graphs in (True, False):
        sync()
        start = time.perf_counter()
        sample(model, prompts, max_new_tokens=args.new_tokens, graphs=graphs, **kw)
        sync()
        seconds = time.perf_counter() - start
        print(f"DECODE graphs={graphs}: {seconds:.3f} s for {args.new_tokens} tokens x {args.prompts * args.group} "
              f"rows ({seconds / args.new_tokens * 1e3:.2f} ms per step, prefill included)", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        sample(model, prompts, max_new_tokens=args.profile_tokens, **kw)
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25,
                                    max_name_column_width=70), flush=True)


def measure(args) -> dict:
    cuda = torch.cuda.is_available() and not args.tiny
    model, vocab = build_model(args, cuda)
    tok = make_tokenizer(vocab)
    rows = make_prompts(tok, args.prompts * (args.steps + 1), args.prompt_len, vocab)
    clock = Clock()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.child == "trl":
        extra = run_trl(args, model, tok, rows, clock, cuda)
    else:
        extra = run_vftrain(args, model, tok, rows, clock, graphs=args.child != "vftrain-eager",
                            master=args.child != "vftrain-no-master")
    timed = [s for s in clock.steps if s["step"] > args.warmup]
    if not timed:
        raise SystemExit(f"no step was timed: --steps {args.steps} must exceed --warmup {args.warmup}")

    def median(key):
        return statistics.median(s.get(key, 0.0) for s in timed)

    rollout, generate, wall = median("rollout"), median("generate"), median("wall")
    completion = median("completion_tokens")
    prompt_tokens = args.prompts * args.group * args.prompt_len
    out = dict(run=args.child, arch="tiny" if args.tiny else args.arch, gpu=torch.cuda.get_device_name() if cuda
               else "cpu", steps=args.steps, warmup=args.warmup, rollouts=args.prompts * args.group,
               prompt_len=args.prompt_len, new_tokens=args.new_tokens, completion_tokens=completion,
               step_s=round(wall, 3), generate_s=round(generate, 3), score_s=round(rollout - generate, 3),
               train_s=round(wall - rollout, 3), rollout_tok_s=round(completion / generate),
               step_tok_s=round((prompt_tokens + completion) / wall), **extra)
    # vftrain's own view of the same steps: its logged split, and whether the rollouts were on-policy (the
    # trainer's logprobs of the sampled tokens against the sampler's: bf16 rounding only).
    for key in ("time/generate", "time/score", "time/train", "tokens_per_second", "importance_ratio_min",
                "importance_ratio_max", "mismatch_kl", "entropy"):
        values = [s["logged"][key] for s in timed if key in s.get("logged", {})]
        if values:
            out[f"logged {key}"] = round(statistics.median(values), 6)
    out["per_step"] = clock.steps
    if cuda:
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def run(cmd, timeout):
    """Run a measuring process, echo its output, return its RESULT dict (or an error dict)."""
    print("$ " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {timeout} s"}, exc.stdout or ""
    result, lines = None, []
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            lines.append(line)
    last = next((x for x in reversed(lines) if x.strip()), "")
    return (result if proc.returncode == 0 and result else {"error": f"exit {proc.returncode}: {last[-300:]}"},
            "\n".join(lines))


def table(results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    first = ok[0] if ok else {}
    lines = [f"RL step on {first.get('gpu', '?')}, {first.get('arch', '?')} shape: {first.get('rollouts', '?')} "
             f"rollouts per step ({first.get('prompt_len', '?')}-token prompts, {first.get('new_tokens', '?')} new "
             f"tokens each), median of steps {first.get('warmup', 0) + 1}..{first.get('steps', '?')}", "",
             "| run | step s | generate s | score s | train s | rollout tok/s | step tok/s | peak GiB |",
             "|" + "---|" * 8]
    trl = next((r for r in ok if r["run"] == "trl"), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error']} |" + " |" * 6)
            continue
        speedup = f" ({trl['step_s'] / r['step_s']:.2f}x TRL)" if trl and r is not trl else ""
        lines.append(f"| {r['run']} | {r['step_s']}{speedup} | {r['generate_s']} | {r['score_s']} | {r['train_s']} "
                     f"| {r['rollout_tok_s']:,} | {r['step_tok_s']:,} | {r.get('peak_mem_gib', '-')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen0.5b", choices=sorted(ARCHS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (chat template included)")
    ap.add_argument("--new-tokens", type=int, default=256, help="max new tokens per completion")
    ap.add_argument("--vocab", type=int, default=1000, help="vocabulary of the --tiny model")
    ap.add_argument("--timeout", type=int, default=240, help="seconds allowed to each run's process")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 2-layer 64-wide model, vocab --vocab, "
                    "4 prompts x 4, 24-token prompts, 8 new tokens, 3 steps")
    ap.add_argument("--out", default=None, help="where to write the markdown table and the RESULT lines (.md/.jsonl; "
                    "default benchmarks/rl_last_run, /tmp/vftrain_rl_tiny with --tiny)")
    ap.add_argument("--profile-decode", action="store_true", help="instead of the runs: time `sample` with and "
                    "without CUDA graphs and print a kernel profile of --profile-tokens decoding steps (GPU)")
    ap.add_argument("--profile-tokens", type=int, default=32, help="decoding steps under the profiler")
    ap.add_argument("--log-dir", default=None, help="also write each run's full output to DIR/rl_RUN.log")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one run in this process
    args = ap.parse_args()
    if args.tiny:
        args.prompts, args.group, args.prompt_len, args.new_tokens, args.steps = 4, 4, 24, 8, 3
    if args.profile_decode:
        return profile_decode(args)
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    results = []
    for name in args.runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--arch", args.arch, "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--prompts", str(args.prompts), "--group",
               str(args.group), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--vocab", str(args.vocab)] + (["--tiny"] if args.tiny else [])
        result, log = run(cmd, args.timeout)
        result = {"run": name, **result}
        if "error" in result:
            print(log[-3000:], flush=True)
        print("RESULT " + json.dumps({k: v for k, v in result.items() if k != "per_step"}), flush=True)
        results.append(result)
        if args.log_dir:
            with open(os.path.join(args.log_dir, f"rl_{name}.log"), "w") as fh:
                fh.write(log)
    text = table(results)
    print("\n" + text)
    out = args.out or ("/tmp/vftrain_rl_tiny" if args.tiny else os.path.join(HERE, "rl_last_run"))
    with open(out + ".md", "w") as fh:
        fh.write(text + "\n")
    with open(out + ".jsonl", "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in results))
    print(f"\nwrote {out}.md and {out}.jsonl")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
