#!/usr/bin/env bash
# Issue 21 in one device call (one H200, ~9 minutes): peak memory and speed at equal tokens per micro-batch for
# vftrain at its defaults (master_weights 'kahan-bf16', lean_mlp on), without lean_mlp, with each other master_weights mode (true,
# kahan, false; with MODES=1) and TRL (BFD packing + liger),
# on the Qwen2.5-0.5B shape (standard rows) and the 1.3B Llama-style shape (long rows, <= 4096 tokens); then a
# Qwen2.5-7B-shape LoRA (rank 8) at 4k and 16k tokens per micro-batch at the defaults beside plain peft +
# transformers' Trainer at the same tokens. Every vftrain run prints vftrain.memory's estimate beside its measured
# peak (memory_estimate_gib, at the run's largest micro-batch).
# usage (GPU machine; .whl/ carried as benchmarks/device.sh says, with trl 1.16.0 in it:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl trl==1.16.0):
#   bash benchmarks/memory21.sh          # writes $OUT/results.jsonl, $OUT/bench.log, $OUT/memory21.md
#   bash benchmarks/memory21.sh --tiny   # CPU check of this script: vftrain runs only, tiny model, 3 steps
#   LEAN_AB=2 bash benchmarks/memory21.sh  # instead: lean_mlp on/off at the defaults, interleaved, 2 rounds per shape,
#                                          # TRL once per shape ($OUT/lean_ab.md: medians; ~7 min): what the
#                                          # memory-lean MLP (the default since session 30) costs or saves
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
: > "$out/results.jsonl"
tiny=""
if [ "${1:-}" = "--tiny" ]; then
  tiny="--tiny"
else
  . benchmarks/wheels.sh && install_wheels || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
DEADLINE=${DEADLINE:-510}  # seconds: no run starts after this (the call's limit is 600)
S="--steps ${STEPS:-8} --warmup ${WARMUP:-3}"

run() {  # run TAG LIMIT_S COMMAND...: RESULT lines (tagged) to results.jsonl, the rest to bench.log
  local tag=$1 limit=$2; shift 2
  if [ "$SECONDS" -ge "$DEADLINE" ]; then echo "=== $tag: skipped at ${SECONDS}s (deadline)"; return; fi
  echo "=== $tag (${SECONDS}s): $*" | tee -a "$out/bench.log"
  timeout "$limit" "$@" > "/tmp/run_$tag.log" 2>&1
  local rc=$?
  cat "/tmp/run_$tag.log" >> "$out/bench.log"
  grep -h '^RESULT ' "/tmp/run_$tag.log" | cut -c8- | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line); r['tag'] = sys.argv[1]; print(json.dumps(r))
    print(sys.argv[1], r.get('framework', r.get('mode')), 'tok/s', r.get('real_tok_s'), 'peak', r.get('peak_mem_gib'),
          'estimate', r.get('memory_estimate_gib'), r.get('error', ''), file=sys.stderr)" "$tag" >> "$out/results.jsonl"
  [ $rc -ne 0 ] && { echo "$tag: exit $rc"; grep -hE "Error|error" "/tmp/run_$tag.log" | grep -v Warning | tail -2 | cut -c1-300; }
}
vf="python3 benchmarks/throughput.py $S $tiny"
# micro_batch_tokens bounds the estimate's tokens per micro-batch (else max_seq_len 16384 x micro_batch_size);
# 1.25x the aimed tokens: packing balances micro-batches near --seq, so it rarely splits one.
A="--arch qwen0.5b --seq 16384 --micro-batch-tokens 20480 --default"
B="--arch llama1.3b --mix long --seq 16384 --micro-batch-tokens 20480 --default"
H100="--card-gib 79.2"  # the issue's 80 GB card (H100 80GB HBM3: 79.2 GiB usable), emulated on the H200
if [ -n "${LEAN_AB:-}" ]; then  # lean_mlp on and off at the defaults, interleaved, LEAN_AB rounds; TRL once per shape
  for round in $(seq "$LEAN_AB"); do
    for s in 05b 13b; do
      shape=$A; [ $s = 13b ] && shape=$B
      run "${s}_off_$round" 150 $vf $shape --no-lean-mlp
      run "${s}_lean_$round" 150 $vf $shape --lean-mlp
    done
  done
  [ -z "$tiny" ] && { run 05b_trl 150 $vf $A --trl --no-vftrain; run 13b_trl 170 $vf $B --trl --no-vftrain; }
  python3 - "$out/results.jsonl" <<'PY' | tee "$out/lean_ab.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| shape | setting | runs | real tok/s (median; all) | peak GiB |")
print("|---|---|---|---|---|")
for s in ("05b", "13b"):
    for setting in ("off", "lean", "trl"):
        mine = [r for r in rows if r["tag"].startswith(f"{s}_{setting}") and r.get("real_tok_s")]
        if mine:
            speeds = [r["real_tok_s"] for r in mine]
            print(f"| {s} | {setting} | {len(mine)} | {statistics.median(speeds):,.0f} ({', '.join(f'{x:,}' for x in speeds)})"
                  f" | {max(r.get('peak_mem_gib') or 0 for r in mine)} |")
PY
  exit 0
fi
# Most telling first (a short call stops at DEADLINE): the 1.3B long-row shape's modes, the 0.5B shape, then the 7B
# LoRA as on an 80 GB card, then a 7B full fine-tune there (must stop before training with a one-line error).
run 13b_default 170 $vf $B --trl  # master_weights unset: 'kahan-bf16' (with torch's AdamW), lean_mlp on
run 13b_no_lean 90 $vf $B --no-lean-mlp  # the default before session 30
[ -n "${MODES:-}" ] && for mode in true kahan false; do  # measured in session 28 (RESULTS.md); MODES=1 again
  run "13b_$mode" 90 $vf $B --master-weights $mode
done
run 05b_default 150 $vf $A --trl
[ -n "${MODES:-}" ] && run 05b_true 80 $vf $A --master-weights true
for t in 4096 16384; do
  run "7b_lora_${t}_80g" 150 $vf --arch qwen7b --lora --default --seq $t --micro-batch-tokens $((t * 5 / 4)) $H100
  [ -z "$tiny" ] && run "7b_peft_$t" 150 python3 benchmarks/trl_anchor.py hf_padded qwen7b --lora 8 --tokens $t $S
done
run 7b_full_80g 90 $vf --arch qwen7b --default --seq 4096 $H100
echo "elapsed ${SECONDS}s"
python3 - "$out/results.jsonl" <<'PY' | tee "$out/memory21.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
trl = {r["arch"]: r for r in rows if r.get("framework") == "trl" and "peak_mem_gib" in r}
print("| run | who | master_weights | lean_mlp / ckpt | tokens per micro-batch (max) | real tok/s | peak GiB "
      "| x TRL's peak | estimate GiB | estimate / peak |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    who = r.get("framework") or r.get("mode")
    peak, est = r.get("peak_mem_gib"), r.get("memory_estimate_gib")
    base = trl.get(r.get("arch"), {}).get("peak_mem_gib")
    cells = [r["tag"], who if "error" not in r else f"{who}: {r['error'][:80]}", str(r.get("master_weights", "-")),
             f"{r.get('lean_mlp', '-')} / {r.get('gradient_checkpointing', r.get('gc', '-'))}",
             f"{r.get('tokens_per_micro_batch', '-')} ({r.get('max_tokens_per_micro_batch', '-')})",
             f"{r.get('real_tok_s', '-'):,}" if r.get("real_tok_s") else "-", str(peak or "-"),
             f"{peak / base:.2f}x" if peak and base and r.get("framework") != "trl" else "-", str(est or "-"),
             f"{est / peak:.2f}" if est and peak else "-"]
    print("| " + " | ".join(cells) + " |")
PY
