#!/usr/bin/env bash
# SFT speed of older commits against the working tree, interleaved on one GPU (a regression hunt: one call's
# figures vary by up to 20% between calls on the same machine, RESULTS.md "old commits against HEAD").
#   bash benchmarks/ab_speed.sh prepare REV...   # here: each REV's vftrain/ and benchmarks/ into .ab/REV (git archive;
#                                                # add /.ab/ to .git/info/exclude and carry ".ab" to the device)
#   bash benchmarks/ab_speed.sh run [ROUNDS]     # there (wheels in .whl/): the working tree and every .ab/REV, in
#                                                # turn, ROUNDS times (default 3); $OUT/ab_speed.md: medians
# Each run: benchmarks/throughput.py --arch ${AB_ARCH:-qwen0.5b} --seq ${AB_SEQ:-16384} --default --breakdown, 12 steps
# of which 8 timed; AB_ARGS adds arguments to every run, AB_HEAD_ARGS to the working tree's only (the session-29 hunt
# gave it --master-weights true, the older commits' default). E.g. the 7B LoRA:
#   AB_ARCH=qwen7b AB_SEQ=4096 AB_ARGS="--lora --micro-batch-tokens 4096 --card-gib 79.2" bash benchmarks/ab_speed.sh run
set -uo pipefail
if [ "${1:-}" = prepare ]; then
  shift
  for rev in "$@"; do
    dir=.ab/$(git rev-parse --short "$rev")
    rm -rf "$dir" && mkdir -p "$dir" && git archive "$rev" vftrain benchmarks pyproject.toml | tar -x -C "$dir"
    echo "$dir"
  done
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 prepare REV... | run [ROUNDS]"; exit 2; }
rounds=${2:-3}
out=$(realpath -m "${OUT:-/tmp/ab_speed}")
mkdir -p "$out"
. benchmarks/wheels.sh && install_wheels || exit 1
# Older throughput.py timed train()'s end too (the curves' plot: matplotlib's import, 0.3-0.5 s): matplotlib made
# unimportable for every tree, so each window holds its steps alone (vftrain skips the plot without matplotlib).
noplot=$(mktemp -d)
mkdir -p "$noplot/matplotlib" && echo 'raise ImportError("matplotlib left out by ab_speed.sh")' > "$noplot/matplotlib/__init__.py"
trees=(. .ab/*/)
: > "$out/ab_speed.jsonl"
for round in $(seq "$rounds"); do
  for tree in "${trees[@]}"; do
    name=$(basename "$(realpath "$tree")")
    [ "$tree" = . ] && name=HEAD
    extra=(); [ "$tree" = . ] && extra=(${AB_HEAD_ARGS:-})
    rm -rf /tmp/vftrain_bench_out
    log="$out/run_${name}_${round}.log"
    (cd "$tree" && PYTHONPATH=$noplot:/tmp/site:$PWD PYTHONUNBUFFERED=1 timeout "${AB_TIMEOUT:-150}" python3 benchmarks/throughput.py \
      --arch "${AB_ARCH:-qwen0.5b}" --seq "${AB_SEQ:-16384}" --default --steps 12 --warmup 4 --breakdown "${extra[@]}" \
      ${AB_ARGS:-} > "$log.tmp" 2>&1)
    mv "$log.tmp" "$log"
    grep -h '^RESULT ' "$log" | cut -c8- | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line); b = r.get('breakdown_ms_per_step', {})
    print(json.dumps(dict(tree=sys.argv[1], round=int(sys.argv[2]), real_tok_s=r.get('real_tok_s'),
                          step_ms=b.get('step (wall)'), fwd_bwd_ms=b.get('forward+backward'),
                          optimizer_ms=b.get('optimizer step (incl. master weights)'),
                          rest_ms=b.get('rest: host work and idle'), peak_gib=r.get('peak_mem_gib'))))" "$name" "$round" \
      | tee -a "$out/ab_speed.jsonl"
  done
done
python3 - "$out/ab_speed.jsonl" <<'PY' | tee "$out/ab_speed.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| tree | runs | real tok/s (median, min-max) | step ms | forward + backward ms | optimizer ms | rest ms "
      "| peak GiB |")
print("|---|---|---|---|---|---|---|---|")
for tree in dict.fromkeys(r["tree"] for r in rows):
    mine = [r for r in rows if r["tree"] == tree and r["real_tok_s"]]
    med = lambda k: statistics.median(r[k] for r in mine)
    speeds = [r["real_tok_s"] for r in mine]
    print(f"| {tree} | {len(mine)} | {med('real_tok_s'):,.0f} ({min(speeds):,}-{max(speeds):,}) | {med('step_ms'):.0f} "
          f"| {med('fwd_bwd_ms'):.0f} | {med('optimizer_ms'):.1f} | {med('rest_ms'):.0f} | {med('peak_gib')} |")
PY
