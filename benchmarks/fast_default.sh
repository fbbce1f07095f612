#!/usr/bin/env bash
# Issue #11 "fast by default": vftrain at SFTConfig's defaults beside tuned settings and TRL's best (BFD packing +
# liger, same run), Qwen2.5-0.5B shape, ~16k tokens per micro-batch, on the standard and the long-prompt mix; with
# the default runs' time breakdown (--breakdown), after the varlen attention checks (gpu_check.py --attention).
# usage (GPU machine, wheels in .whl/ as device.sh says): bash benchmarks/fast_default.sh
# Writes $OUT/gpu_check.log, $OUT/bench.log (every RESULT line) and $OUT/tables.md.
set -uo pipefail
. benchmarks/wheels.sh && install_wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/gpu_check.py --attention 2>&1 | tee "$out/gpu_check.log" | grep -v Warning
run() {
  local tag=$1; shift
  echo "=== $tag: $*" | tee -a "$out/bench.log"
  python3 benchmarks/throughput.py --arch qwen0.5b --seq 16384 --steps ${STEPS:-20} --warmup 5 "$@" \
    --out "/tmp/table_$tag.md" 2>&1 | tee -a "$out/bench.log" | grep -E "RESULT|error|Error|Traceback" | cut -c1-1200
  { echo "### $tag: $*"; cat "/tmp/table_$tag.md"; echo; } >> "$out/tables.md"
}
run std_default --default --trl --breakdown
run long_default --mix long --default --trl --breakdown
run std_liger --attn auto --vf-liger --no-lean-mlp
run long_liger --mix long --attn auto --vf-liger --no-lean-mlp
run std_compile_liger --attn auto --vf-liger --compile --no-lean-mlp
