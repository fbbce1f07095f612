"""RL step time with rollouts sampled ahead (`num_batches_ahead`) against a separate sampling server, on CPU.

What runs: `python -m vftrain.serve` on the RL demo's starting model (assets/addition-noisy-sft) in its own
process, and in this process the demo's RL step (examples/sft_then_rl/rl.toml: 32 prompts x 8 rollouts, at most 8
new tokens, full fine-tuning, so every step saves and pushes the weights) with rl_backend = "openai", once per
value of --ahead, the values alternating over --repeats rounds. Step wall time = the interval between consecutive
optimizer step ends; the first --warmup steps of each run are not counted; figures are medians over the rest, with
the run's time/* metrics (seconds waiting for rollouts, pushing, generating, training).

usage: python benchmarks/rl_overlap.py --steps 12 --repeats 2
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
MODEL = os.path.join(ROOT, "assets", "addition-noisy-sft")


def start_server(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "vftrain.serve", "--model", MODEL, "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("vftrain.serve did not start")


def run(ahead: int, url: str, steps: int, warmup: int) -> dict:
    import vftrain as vf
    from transformers import TrainerCallback

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        cfg = vf.RLConfig(output_dir=out, dataset=os.path.join(ROOT, "assets", "addition-noisy"),
                          reward_funcs=["exact_match"], rollouts_per_example=8, batch_size=256,
                          micro_batch_size=256, packing=False, max_prompt_len=24, max_new_tokens=8, max_seq_len=32,
                          scale_rewards="group", learning_rate=3e-4, max_steps=steps, logging_steps=1,
                          save_strategy="no", seed=0, disable_tqdm=True, report_to="none", rl_backend="openai",
                          sample_base_url=url, num_batches_ahead=ahead)
        trainer = vf.RLTrainer(model=MODEL, args=cfg)
        ends = StepEnds()
        trainer.add_callback(ends)
        trainer.train()
        records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in x]
    gaps = [b - a for a, b in zip(ends.times, ends.times[1:])][warmup:]
    later = records[warmup + 1:]
    out = {"ahead": ahead, "step_s": statistics.median(gaps), "steps_timed": len(gaps)}
    for key in ("time/wait", "time/sync", "time/generate", "time/score", "time/train"):
        values = [r[key] for r in later if key in r]
        if values:
            out[key] = statistics.median(values)
    out["reward_last"] = records[-1]["reward"]
    out["importance_ratio_max"] = max(r["importance_ratio_max"] for r in later)  # != 1: trained off-policy
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ahead", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_server(port)
    try:
        for _ in range(args.repeats):
            for ahead in args.ahead:
                print(json.dumps(run(ahead, f"http://127.0.0.1:{port}/v1", args.steps, args.warmup)), flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
