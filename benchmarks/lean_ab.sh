#!/usr/bin/env bash
# lean_mlp on and off at SFT's defaults, interleaved, ROUNDS times (default 2), at the two shapes of issue 21 (0.5B
# standard rows, 1.3B Llama-style long rows; ~16k tokens per micro-batch), then TRL once per shape: whether the
# memory-lean MLP (0.80x TRL's peak at 1.3B) costs speed anywhere, before it becomes the default. One H200 call,
# ~7 minutes; $OUT/lean_ab.jsonl (every run) and $OUT/lean_ab.md (medians).
# usage (repo root, the wheels in .whl/ as memory21.sh says): bash benchmarks/lean_ab.sh [ROUNDS]
#        LEAN_TINY=1 bash benchmarks/lean_ab.sh 1     # CPU check of this script (tiny model, no TRL)
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
: > "$out/lean_ab.jsonl"
if [ -d .whl ] && command -v nvidia-smi >/dev/null; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
declare -A shape=([05b]="--arch qwen0.5b --seq 16384 --micro-batch-tokens 20480"
                  [13b]="--arch llama1.3b --mix long --seq 16384 --micro-batch-tokens 20480")
run() {  # run TAG ARGS...: its RESULT lines, tagged, into lean_ab.jsonl
  local tag=$1; shift
  rm -rf /tmp/vftrain_bench_out
  # shellcheck disable=SC2068
  timeout 170 python3 benchmarks/throughput.py --steps 10 --warmup 3 --default ${LEAN_TINY:+--tiny} $@ > "/tmp/lean_$tag.log" 2>&1 \
    || { echo "$tag: failed"; tail -3 "/tmp/lean_$tag.log"; }
  grep -h '^RESULT ' "/tmp/lean_$tag.log" | cut -c8- | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line); r['tag'] = sys.argv[1]; print(json.dumps(r))
    print(sys.argv[1], r.get('framework'), r.get('real_tok_s'), 'tok/s, peak', r.get('peak_mem_gib'), file=sys.stderr)
" "$tag" >> "$out/lean_ab.jsonl"
}
for round in $(seq "${1:-2}"); do
  for s in 05b 13b; do
    run "${s}_off_$round" ${shape[$s]}
    run "${s}_lean_$round" ${shape[$s]} --lean-mlp
  done
done
[ -z "${LEAN_TINY:-}" ] && for s in 05b 13b; do run "${s}_trl" ${shape[$s]} --trl --no-vftrain; done
python3 - "$out/lean_ab.jsonl" <<'PY' | tee "$out/lean_ab.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| shape | setting | runs | real tok/s (median; all) | peak GiB |")
print("|---|---|---|---|---|")
for s in ("05b", "13b"):
    for setting in ("off", "lean", "trl"):
        mine = [r for r in rows if r["tag"].startswith(f"{s}_{setting}") and r.get("real_tok_s")]
        if mine:
            speeds = [r["real_tok_s"] for r in mine]
            print(f"| {s} | {setting} | {len(mine)} | {statistics.median(speeds):,.0f} ({', '.join(f'{x:,}' for x in speeds)}) "
                  f"| {max(r.get('peak_mem_gib') or 0 for r in mine)} |")
PY
