"""Compare the per-step loss curves of runs with the same global batch (metrics.jsonl of each run's folder).

usage: python benchmarks/compare_curves.py REFERENCE_DIR OTHER_DIR... > curves.md
Prints a markdown table: the loss at a few steps for every run, then each run's largest absolute and relative
difference from the reference over all steps, and the same for the gradient norm.
"""
import json
import os
import sys


def curve(folder):
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    records = [json.loads(line) for line in open(path)]
    return {r["step"]: r for r in records if "loss" in r}


def main(folders):
    runs = {os.path.basename(f.rstrip("/")): curve(f) for f in folders}
    ref_name = next(iter(runs))
    ref = runs[ref_name]
    steps = sorted(ref)
    shown = sorted({steps[0], *steps[4::5], steps[-1]})
    print("| run | " + " | ".join(f"loss @{s}" for s in shown) + " | max abs / rel diff loss | max rel diff gnorm |")
    print("|---|" + "---|" * (len(shown) + 2))
    for name, run in runs.items():
        if run is None:
            print(f"| {name} | no metrics.jsonl (run failed) |")
            continue
        common = [s for s in steps if s in run]
        d_abs = max(abs(run[s]["loss"] - ref[s]["loss"]) for s in common)
        d_rel = max(abs(run[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in common)
        g_rel = max(abs(run[s]["grad_norm"] - ref[s]["grad_norm"]) / abs(ref[s]["grad_norm"]) for s in common)
        cells = " | ".join(f"{run[s]['loss']:.4f}" if s in run else "-" for s in shown)
        note = " (reference)" if name == ref_name else ""
        print(f"| {name}{note} | {cells} | {d_abs:.4f} / {d_rel:.2%} | {g_rel:.2%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
