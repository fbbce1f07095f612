"""Why do `rl_throughput.py --varied` completions differ in length between frameworks? (H200, session 29: vftrain's
mean completion 134 tokens, TRL's 54, on the same random model made to sample its stop token at ~1/64 per step;
on the CPU's tiny model they agree: 14.2 and 16.1.)

On the same model and prompts (rl_throughput's `build_model --varied`, `make_prompts`), the probability of the stop
token as the first completion token, four ways (vftrain's trainer agrees with its sampler: the RL runs' ratio ~1):
  hf         the model's own forward (transformers' modules), softmax of the last prompt position;
  liger      the same after vftrain's `apply_liger` (what RLTrainer samples and trains with on a GPU);
  sample     the share of stop tokens among the first tokens of vftrain's `sample` (the RL sampler), liger on;
  generate   the same share from transformers' `generate` (what TRL's GRPOTrainer calls), on an unpatched copy.
A framework whose number stands apart computes another function of the same weights. Then whole completions
(`calibrate`): each sampler's stops against the sum of the model's stop probabilities along its own rows.
Answer (H200, session 30, RESULTS.md "Graph capture after compaction"): all four agree and both samplers are
calibrated; the RL runs' lengths part after the first update (training moves the policies differently).

usage (repo root; GPU, the wheels as rl_throughput needs):
       python benchmarks/stop_probe.py [--arch qwen0.5b] [--rows 2048]
       python benchmarks/stop_probe.py --tiny      # CPU: no liger, float32
"""
import argparse
import copy
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from rl_throughput import STOP_ID, build_model, make_prompts, make_tokenizer, stop_prob  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen0.5b")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256, help="sets the designed stop probability (4 / this)")
    ap.add_argument("--rows", type=int, default=2048, help="first tokens drawn per sampler")
    ap.add_argument("--vocab", type=int, default=1000)
    args = ap.parse_args()
    args.varied, args.stop_prob = True, None
    if args.tiny:
        args.prompt_len = min(args.prompt_len, 24)
    cuda = torch.cuda.is_available() and not args.tiny
    model, vocab = build_model(args, cuda, args.arch)
    tok = make_tokenizer(vocab)
    row = make_prompts(tok, 1, args.prompt_len, vocab)[0]
    ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True)
    ids = list(ids) if isinstance(ids, list) else list(ids["input_ids"])
    device = next(model.parameters()).device
    print(f"designed stop probability {stop_prob(args):.4f}; prompt {len(ids)} tokens, {ids.count(STOP_ID)} of them "
          f"the stop token", flush=True)

    def last_position(m) -> float:
        with torch.no_grad():
            logits = m(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
        return float(logits.softmax(-1)[STOP_ID])

    plain = copy.deepcopy(model)
    print(f"hf        {last_position(plain):.4f}", flush=True)
    from vftrain.models import apply_liger, liger_applies
    from vftrain.sampling.tokens import sample

    if liger_applies(model):
        apply_liger(model)
        print(f"liger     {last_position(model):.4f}", flush=True)
    drawn = sample(model, [ids], n=args.rows, max_new_tokens=1, temperature=1.0, top_p=1.0, stop_ids={STOP_ID},
                   pad_id=0, seed=0)[0]
    stopped = [s for s in drawn if s.completion_ids[0] == STOP_ID]
    own = math.exp(stopped[0].logprobs[0]) if stopped else float("nan")  # the sampler's probability of the stop
    print(f"sample    {len(stopped) / len(drawn):.4f} (of {len(drawn)}; the sampler's own probability of the stop "
          f"token {own:.4f})", flush=True)
    with torch.no_grad():
        out = plain.generate(input_ids=torch.tensor([ids] * args.rows, device=device), max_new_tokens=1, do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=STOP_ID)
    print(f"generate  {float((out[:, -1] == STOP_ID).float().mean()):.4f} (of {args.rows})", flush=True)
    calibrate(args, model, plain, ids, device)


def calibrate(args, model, plain, ids, device):
    """Whole completions: a sampler that draws from the model stops, summed over its rows, as often as the model's
    stop probabilities along those rows add up to (each row stops at most once; the sum of p(stop) over the steps it
    took is that count's expectation). Judged by the plain model's forward; a sampler off it shows here."""
    from vftrain.sampling.tokens import sample

    rows = min(args.rows, 256)
    drawn = sample(model, [ids], n=rows, max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0,
                   stop_ids={STOP_ID}, pad_id=0, seed=1)[0]
    with torch.no_grad():
        out = plain.generate(input_ids=torch.tensor([ids] * rows, device=device), max_new_tokens=args.new_tokens,
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0,
                             eos_token_id=STOP_ID)[:, len(ids):].tolist()
    cut = [c[:c.index(STOP_ID) + 1] if STOP_ID in c else c for c in out]
    for name, completions in (("sample", [list(s.completion_ids) for s in drawn]), ("generate", cut)):
        stops = sum(c[-1] == STOP_ID for c in completions)
        expected = 0.0
        for i in range(0, rows, 32):
            batch = [ids + c for c in completions[i:i + 32]]
            width = max(map(len, batch))
            x = torch.tensor([b + [0] * (width - len(b)) for b in batch], device=device)
            with torch.no_grad():
                p = plain(input_ids=x).logits.float().softmax(-1)[..., STOP_ID]
            for j, c in enumerate(completions[i:i + 32]):
                expected += float(p[j, len(ids) - 1:len(ids) - 1 + len(c)].sum())
        mean = sum(map(len, completions)) / rows
        print(f"{name:9s} whole completions: mean length {mean:.1f}, stops {stops} of {rows}, "
              f"expected from the model {expected:.1f}", flush=True)


if __name__ == "__main__":
    main()
