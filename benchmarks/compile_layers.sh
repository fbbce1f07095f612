#!/usr/bin/env bash
# compile_layers against eager layers (liger on, the previous default), same call, on the lent GPU machine:
#   bash benchmarks/compile_layers.sh NAME "THROUGHPUT ARGS" [NAME "ARGS"]...
# Each NAME runs benchmarks/throughput.py --default --breakdown ARGS twice, with compile_layers unset (on for models of
# >= 100M parameters) and with --compile-layers false (MODES: any of default, true, false); logs and $OUT/compile_layers.jsonl (one line per run: speed,
# peak, and wall seconds from start to exit, which holds the compile time).
set -uo pipefail
. benchmarks/wheels.sh && install_wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
out=$(realpath -m "${OUT:-/tmp/compile_layers}")
mkdir -p "$out"
while [ $# -ge 2 ]; do
  name=$1 bench=$2; shift 2
  for mode in ${MODES:-default false}; do
    extra=(); [ $mode != default ] && extra=(--compile-layers $mode)
    log="$out/${name}_${mode}.log"
    start=$(date +%s.%N)
    timeout "${RUN_TIMEOUT:-240}" python3 benchmarks/throughput.py --default --breakdown $bench "${extra[@]}" \
      --out "$out/${name}_${mode}.md" > "$log" 2>&1
    rc=$?
    wall=$(python3 -c "import time; print(round(time.time() - $start, 1))")
    grep -h '^RESULT ' "$log" | cut -c8- | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line); b = r.get('breakdown_ms_per_step', {})
    print(json.dumps(dict(name=sys.argv[1], compile_layers=r.get('compile_layers'), liger=r.get('liger'), rc=int(sys.argv[2]),
                          wall_s=float(sys.argv[3]), real_tok_s=r.get('real_tok_s'), step_ms=b.get('step (wall)'),
                          fwd_bwd_ms=b.get('forward+backward'), forwards_per_step=r.get('forwards_per_step'),
                          tokens_per_forward=r.get('tokens_per_micro_batch'), peak_gib=r.get('peak_mem_gib'),
                          estimate_gib=r.get('memory_estimate_gib'), gc=r.get('gradient_checkpointing'),
                          lean_mlp=r.get('lean_mlp'), mfu=r.get('mfu'), error=r.get('error'))))" "$name" "$rc" "$wall" \
      | tee -a "$out/compile_layers.jsonl"
  done
done
