#!/usr/bin/env bash
# Runs on the lent GPU machine (see /work/.library/device): install the carried wheels (.whl/: datasets, trl,
# liger-kernel; nothing there can be downloaded), check the fast paths, then the benchmark given as args.
# usage: bash benchmarks/device.sh [throughput.py args...]   (writes logs and tables under $OUT)
set -uo pipefail
. benchmarks/wheels.sh && install_wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
out=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, datasets, trl, liger_kernel; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'trl', trl.__version__)"
python3 benchmarks/gpu_check.py 2>&1 | tee "$out/gpu_check.log" | grep -v Warning
[ $# -gt 0 ] && python3 benchmarks/throughput.py "$@" --out "$out/table${TAG:-}.md" 2>&1 | tee "$out/bench${TAG:-}.log" \
  | grep -E "RESULT|^\||error|Error|Traceback|wrote" | cut -c1-600
