#!/usr/bin/env bash
# The test suite on a CUDA machine in one call: the GPU paths (liger-kernel, the varlen flash kernel, fused AdamW,
# the fused output head on the GPU) and the tests that pin the CPU. Run it from the repository root.
# Packages the machine lacks travel as wheels in .whl/ (README, Tests), installed here into /tmp/site; test files
# whose packages are missing (openai: test_serve.py, verifiers: test_rl_env.py) are left out and named. Tests of CPU
# semantics pin the CPU themselves (use_cpu in tests/conftest.py's small_config, no GPU for subprocess workers).
# The lent H200 (torch 2.11, transformers 5.17) lacks datasets 5.2.0 (+ dill 0.4.1, multiprocess 0.70.19),
# liger-kernel 0.8.5 and openai 2.54.0 (+ pydantic, pydantic-core, annotated-types, typing-inspection, jiter, distro,
# sniffio): fetch them with `pip download --no-deps --only-binary=:all: --python-version 3.12 ...` (benchmarks/RESULTS.md,
# Commands); never carry pyarrow or pandas.
# Writes the log and a JUnit XML under $OUT (default /tmp/gpu-tests).
# usage: bash tests/gpu.sh [pytest args, e.g. -k liger or a file]
set -uo pipefail
out=${OUT:-/tmp/gpu-tests}
mkdir -p "$out"
export PYTHONPATH=$PWD
# shellcheck disable=SC2046  # DeepSpeed's wheels (.whl/ds/, benchmarks/RESULTS.md), where carried, are separate words
. benchmarks/wheels.sh && install_wheels $(ls .whl/ds/*.whl 2>/dev/null) || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 - <<'EOF'
from importlib import metadata
import torch
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none", torch.cuda.device_count())
for name in ("torch", "transformers", "accelerate", "peft", "datasets", "liger-kernel", "triton", "pytest-xdist",
             "deepspeed", "openai", "verifiers", "matplotlib"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "MISSING")
EOF
# Left out unless ALL=1: test_distributed.py runs CPU processes over gloo (its workers see no GPU, so it checks what
# CI checks) and test_readme.py the README's commands one after another (minutes).
skip=()
[ "${ALL:-0}" = 1 ] || skip+=(--ignore=tests/test_distributed.py --ignore=tests/test_readme.py)
python3 -c "import openai" 2>/dev/null || skip+=(--ignore=tests/test_serve.py)
python3 -c "import verifiers" 2>/dev/null || skip+=(--ignore=tests/test_rl_env.py)
echo "left out: ${skip[*]:-nothing}"
# A worker per core, less two (not GNU nproc: it counts OMP_NUM_THREADS); most tests use one CPU thread each.
cores=$(python3 -c 'import os; print(len(os.sched_getaffinity(0)))')
python3 -m pytest -q -o addopts='' -p no:cacheprovider -n "$(( cores > 3 ? cores - 2 : 2 ))" --dist loadfile \
  -W ignore::DeprecationWarning \
  -W ignore::FutureWarning --durations=25 --junitxml="$out/junit.xml" -rfE --tb=short "${skip[@]}" "$@" \
  2>&1 | tee "$out/pytest.log"
