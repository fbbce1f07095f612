#!/usr/bin/env bash
# Issue 20's measurements in one device call of at most ~9 minutes on one H200 (benchmarks/rl_throughput.py):
#   1. --varied at the 0.5B shape (RL20_VARIED_ARCHS), 256 + 256: completions that stop early (stop token at ~1/64 per step; mean 132
#      tokens on the H200), vftrain vs TRL;
#   2. the length sweep: 0.5B and 1.5B, prompt = completion = 128, 512, 256, 1024 tokens in that order, vftrain vs
#      TRL, 3 steps (1 warm-up) of 16 prompts x 8 rollouts; runs that would end past the budget less RL20_RESERVE
#      seconds (120) are skipped and listed as such (--deadline);
#   3. --profile-decode at the Qwen2.5-0.5B and -1.5B shapes, 128 and 256 rows, 256 + 256 tokens: ms per decoding
#      step (CUDA-graph decoder) beside the bandwidth floor, and the GPU time per step by kernel (first shape), with the
#      time left; 4. the same at 128 rows with liger's fused RoPE kernel (--fused-rope); 5. with each decoding
#      step's forward compiled by torch.compile inside the CUDA graph (--compile-decode; 128 rows).
# Every run prints its GPU-memory breakdown. Results: $OUT/rl20_*.md (tables), .jsonl (every figure), $OUT/logs/ (one
# log per phase; each run's own log in $RL20_RUN_LOGS, /tmp/rl20_runs: the device returns at most 8 files).
# usage (repo root, the wheels in .whl/ as for benchmarks/device.sh):   bash benchmarks/rl20.sh
#   RL20_BUDGET=seconds for everything (530), RL20_LENGTHS="128 512 ..." the sweep's lengths in order,
#   RL20_ARCHS="qwen1.5b" the sweep's shapes (both: the whole table needs about three calls; TRL alone takes ~210 s
#   at 0.5B and ~335 s at 1.5B for 1024 + 1024),
#   RL20_PHASES="varied lengths decode rope compile" the phases to run (all by default),
#   RL20_VARIED_ARCHS="qwen0.5b qwen1.5b" the shapes of the early-stopping runs (0.5B by default),
#   RL20_VARIED_LR=1e-12: both frameworks' learning rate in those runs (default: each one's own; a tiny one keeps the
#   completion lengths the model's, which training otherwise moves apart: RESULTS.md, session 30),
#   RL20_TINY=1: a CPU dry run of the same steps (tiny model, short lengths).
set -uo pipefail
start=$(date +%s)
budget=${RL20_BUDGET:-530}
out=${OUT:-/tmp/out}
runs=${RL20_RUN_LOGS:-/tmp/rl20_runs}
mkdir -p "$out/logs" "$runs"
log() { echo "[rl20 +$(( $(date +%s) - start )) s] $*"; }
left() { echo $(( budget - ($(date +%s) - start) )); }
. benchmarks/wheels.sh && install_wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)" \
  || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

bench="python3 benchmarks/rl_throughput.py"
if [ -n "${RL20_TINY:-}" ]; then
  tiny=(--tiny) shape=(--prompt-len 24 --new-tokens 32) lengths=${RL20_LENGTHS:-"16 48"} rows=(16 32)
else
  tiny=() shape=(--prompt-len 256 --new-tokens 256) lengths=${RL20_LENGTHS:-"128 512 256 1024"} rows=(128 256)
fi
archs=${RL20_ARCHS:-"qwen0.5b qwen1.5b"}
show() { grep -E "^(RESULT|SKIP|DECODE |DECODE_PROFILE|\\$|\\|)|rror|Traceback|wrote" | cut -c1-500; }

# First the early-stopping runs (short; they check that decoding rollouts that stop early is not slower than full
# ones, as it was before the compaction kept power-of-two batches), then the length table (a short call stops at the
# budget), then the decoding step against the floor.
phases=" ${RL20_PHASES:-varied lengths decode rope compile} "
on() { [[ "$phases" == *" $1 "* ]] && [ "$(left)" -gt "$2" ]; }

log "1/5 completions that stop early (--varied), $(left) s left"
# shellcheck disable=SC2086  # the shapes are separate words
on varied 60 && timeout $(( $(left) - 10 )) $bench "${tiny[@]}" --varied ${RL20_VARIED_LR:+--lr $RL20_VARIED_LR} --arch ${RL20_VARIED_ARCHS:-qwen0.5b} --runs vftrain trl "${shape[@]}" --steps 3 \
  --warmup 1 --timeout 150 --deadline $(( $(left) - 40 )) --out "$out/rl20_varied" --log-dir "$runs" 2>&1 \
  | tee "$out/logs/varied.log" | show

log "2/5 lengths $lengths, $(left) s left"
# shellcheck disable=SC2086  # the lengths are separate words
on lengths 60 && timeout $(( $(left) - 5 )) $bench "${tiny[@]}" --arch $archs --runs vftrain trl --lengths $lengths \
  --steps 3 --warmup 1 --timeout 300 --deadline $(( $(left) - ${RL20_RESERVE:-120} )) --out "$out/rl20_lengths" \
  --log-dir "$runs" 2>&1 | tee "$out/logs/lengths.log" | show

log "3/5 decoding step vs bandwidth floor"
on decode 40 && timeout $(( $(left) - 5 )) $bench "${tiny[@]}" --profile-decode --arch qwen0.5b qwen1.5b "${shape[@]}" \
  --decode-rows "${rows[@]}" --no-eager --profile-tokens 16 --out "$out/rl20" 2>&1 | tee "$out/logs/decode.log" | show

if [ -z "${RL20_TINY:-}" ]; then  # liger's RoPE kernel is Triton: the GPU only (TRITON_INTERPRET=1 on the CPU is slow)
  log "4/5 the same with liger's fused RoPE (what fusing it would save)"
  on rope 40 && timeout $(( $(left) - 5 )) $bench --profile-decode --fused-rope --arch qwen0.5b qwen1.5b \
    "${shape[@]}" --decode-rows 128 --no-eager --profile-tokens 16 --out "$out/rl20_rope" 2>&1 \
    | tee "$out/logs/decode_rope.log" | show
fi
log "5/5 the same with each decoding step's forward compiled (torch.compile inside the CUDA graph)"
on compile 60 && timeout $(( $(left) - 5 )) $bench "${tiny[@]}" --profile-decode --compile-decode --arch qwen0.5b qwen1.5b \
  "${shape[@]}" --decode-rows "${rows[0]}" --no-eager --profile-tokens 16 --out "$out/rl20_compile" 2>&1 \
  | tee "$out/logs/decode_compile.log" | show

log "done"
for f in "$out"/rl20_varied.md "$out"/rl20_lengths.md; do [ -f "$f" ] && { echo; cat "$f"; }; done
grep -hE "^DECODE( |_PROFILE)" "$out"/logs/decode*.log
