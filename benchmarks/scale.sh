#!/usr/bin/env bash
# Multi-GPU checks on the lent 2-GPU machine (see /work/.library/device): install the carried wheels (.whl/ and
# .whl/ds/ for DeepSpeed, see RESULTS.md), then
#   bash benchmarks/scale.sh curves   # 0.5B: same global batch on 1 GPU, 2 GPUs DDP, FSDP2, ZeRO-3 -> curves.md
#   bash benchmarks/scale.sh precision  # 0.5B curves at lr 2e-5: float32 weights, pure bf16, bf16 + master weights
#   bash benchmarks/scale.sh speed    # 1.5B: 1 GPU, 2 GPUs DDP and FSDP2 (GA 4); master weights cost -> results.jsonl
#   bash benchmarks/scale.sh resume   # FSDP2 / ZeRO-3: save at step 3, resume, compare; checkpoint loads
#   bash benchmarks/scale.sh lora     # LoRA: 1 GPU vs FSDP2 curves, merged model written and loaded
#   bash benchmarks/scale.sh fsdp7b   # 7B full fine-tune under FSDP2 (issue #12); needs no DeepSpeed wheels
#   bash benchmarks/scale.sh save7b   # the same, saved and loaded with from_pretrained
#   bash benchmarks/scale.sh resume7b # 7B FSDP2: checkpoint at step 2 (sharded resume state), resume to step 4
# Every run's log and metrics land under $OUT. WHL names the wheel folder (default .whl).
set -uo pipefail
whl=${WHL:-.whl}
# shellcheck disable=SC2046  # the DeepSpeed wheels, where carried, are separate words
. benchmarks/wheels.sh && install_wheels $(ls "$whl"/ds/*.whl 2>/dev/null) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
out=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
one() { CUDA_VISIBLE_DEVICES=0 python3 benchmarks/throughput.py "$@"; }
two() { timeout "${LIMIT:-1800}" python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/throughput.py "$@"; }
run() {  # run NAME one|two ARGS...: log to $OUT/NAME.log, keep the RESULT line
  local name=$1; shift
  "$@" > "$out/$name.log" 2>&1
  echo "$name exit $?: $(grep -h '^RESULT' "$out/$name.log" | cut -c8- | tee -a "$out/results.jsonl")"
  grep -h '^SAVED\|^CKPT' "$out/$name.log"
  grep -hE "Error|error:" "$out/$name.log" | grep -v Warning | tail -3
}
case ${1:-} in
  curves)
    C="--child qwen0.5b --task chain --steps 30 --warmup 3 --seq 16384 --attn varlen --vf-liger --lr 2e-4"
    run curve_1gpu one $C --ga 4 --metrics-dir "$out/1gpu"
    run curve_ddp two $C --ga 2 --metrics-dir "$out/2gpu_ddp"
    run curve_fsdp two $C --ga 2 --engine fsdp --metrics-dir "$out/2gpu_fsdp2"
    run curve_zero3 two $C --ga 2 --engine zero3 --metrics-dir "$out/2gpu_zero3"
    python3 benchmarks/compare_curves.py "$out"/1gpu "$out"/2gpu_* | tee "$out/curves.md" ;;
  precision)  # 0.5B, 1 GPU, lr 2e-5: float32 weights (autocast) vs pure bf16 vs bf16 + float32 master weights
    P="--child qwen0.5b --task chain --steps 30 --warmup 3 --seq 16384 --attn varlen --vf-liger --ga 4 --lr 2e-5"
    run p_fp32 one $P --fp32-weights --metrics-dir "$out/lr2e-5_fp32_weights"
    run p_pure one $P --no-master --metrics-dir "$out/lr2e-5_pure_bf16"
    run p_master one $P --metrics-dir "$out/lr2e-5_bf16_master_weights"
    python3 benchmarks/compare_curves.py "$out"/lr2e-5_* | tee "$out/precision.md" ;;
  speed)
    S="--child qwen1.5b --steps 12 --warmup 4 --ga 4 --seq 16384 --attn varlen --vf-liger"
    run speed_1gpu one $S
    run speed_ddp two $S
    run speed_1gpu_pure_bf16 one $S --no-master
    run speed_fsdp two $S --engine fsdp ;;
  resume)  # sharded checkpoints: save at step 3, resume, same steps 4-6; the saved model loads with transformers
    R="--child qwen0.5b --task chain --steps 6 --warmup 1 --seq 16384 --attn varlen --vf-liger --ga 2 --lr 2e-4"
    for e in fsdp zero3; do
      run r_$e two $R --engine $e --save-steps 3 --metrics-dir /tmp/ckpt/${e}_straight
      run r_${e}_resumed two $R --engine $e --save-steps 3 --metrics-dir /tmp/ckpt/${e}_resumed \
        --resume /tmp/ckpt/${e}_straight/checkpoint-3
      ls /tmp/ckpt/${e}_straight/checkpoint-3 | tr '\n' ' '; echo
      python3 benchmarks/compare_curves.py /tmp/ckpt/${e}_straight /tmp/ckpt/${e}_resumed | tee -a "$out/resume.md"
      python3 -c "import sys, torch; from transformers import AutoModelForCausalLM as M
m = M.from_pretrained(sys.argv[1]); print(sys.argv[1], 'loads:', sum(p.numel() for p in m.parameters()), 'params',
      m.dtype, 'finite', all(torch.isfinite(p).all().item() for p in m.parameters()))" /tmp/ckpt/${e}_straight/checkpoint-6
    done ;;
  lora)  # LoRA under FSDP2 (bf16 base, float32 adapters), merged on the main process, loaded with transformers
    L="--child qwen0.5b --task chain --steps 6 --warmup 2 --seq 16384 --attn varlen --vf-liger --ga 2 --lr 2e-4"
    run lora_1gpu one $L --ga 4 --lora --merge --metrics-dir "$out/lora_1gpu"
    run lora_fsdp two $L --lora --merge --engine fsdp --metrics-dir "$out/lora_fsdp"
    python3 benchmarks/compare_curves.py "$out"/lora_1gpu "$out"/lora_fsdp | tee "$out/lora.md" ;;
  fsdp7b)  # Qwen2.5-7B shape, ~16k tokens per micro-batch and GPU, one micro-batch per step: activation
           # checkpointing on every 2nd layer, then on every layer with the final model saved and loaded by
           # transformers. Each run gets the time left of a 450 s window (the device call's budget).
    F="--child qwen7b --engine fsdp --steps 8 --warmup 3 --seq 16384 --attn varlen --vf-liger --breakdown"
    LIMIT=270 run fsdp7b_gc2 two $F --gc --gc-every 2
    LIMIT=$((450 - SECONDS)) run fsdp7b_gc1 two $F --gc --save-final /tmp/fsdp7b_final
    df -h /tmp | tail -1; echo "elapsed ${SECONDS}s" ;;
  save7b)  # the 7B FSDP2 run saved after 4 steps and loaded with transformers (after fsdp7b's save was cut short)
    LIMIT=400 run fsdp7b_save two --child qwen7b --engine fsdp --steps 4 --warmup 2 --seq 16384 --attn varlen \
      --vf-liger --gc --save-final /tmp/fsdp7b_final
    ls -la /tmp/fsdp7b_final; echo "elapsed ${SECONDS}s" ;;
  resume7b)  # 7B FSDP2 with vftrain's default sharded resume state: a checkpoint at step 2, a second run resumes
              # from it to step 4 (losses at steps 3-4 compared), then transformers loads the checkpoint's model.
              # Learnable rows at lr 1e-4, so that a resume that lost the Adam moments would show in the losses.
    K="--child qwen7b --engine fsdp --steps 4 --warmup 2 --seq 16384 --attn varlen --vf-liger --gc --task chain"
    K="$K --lr 1e-4 --save-at 2"
    c=/tmp/r7/straight/checkpoint-2
    df -h /tmp | tail -1
    LIMIT=330 run r7_straight two $K --metrics-dir /tmp/r7/straight
    du -sh $c $c/* 2>&1 | tee "$out/r7_disk.txt"; df -h /tmp | tail -1; echo "elapsed ${SECONDS}s"
    LIMIT=$((515 - SECONDS)) run r7_resumed two $K --metrics-dir /tmp/r7/resumed --resume $c
    echo "elapsed ${SECONDS}s"
    python3 - /tmp/r7/straight /tmp/r7/resumed <<'PY' | tee "$out/resume7b.md"
import json, sys
runs = [{r["step"]: r for r in map(json.loads, open(f + "/metrics.jsonl")) if "loss" in r} for f in sys.argv[1:]]
print("| step | loss straight | loss resumed | abs diff | grad norm straight | grad norm resumed |")
print("|---|---|---|---|---|---|")
for s, a in sorted(runs[0].items()):
    b = runs[1].get(s)
    cells = [f"{b['loss']:.6f}", f"{abs(b['loss'] - a['loss']):.2e}"] if b else ["-", "-"]
    print(f"| {s} | {a['loss']:.6f} | " + " | ".join(cells) + f" | {a['grad_norm']:.4f} | "
          + (f"{b['grad_norm']:.4f} |" if b else "- |"))
PY
    timeout $((580 - SECONDS)) python3 -c "import sys, time, torch; from transformers import AutoModelForCausalLM as M
t = time.perf_counter(); m = M.from_pretrained(sys.argv[1], dtype='auto'); t = time.perf_counter() - t
print(sys.argv[1], f'loads in {t:.1f}s:', sum(p.numel() for p in m.parameters()), 'params', m.dtype, 'finite',
      all(torch.isfinite(p).all().item() for p in m.parameters()))" $c 2>&1 | grep -v Warning | tail -2
    echo "elapsed ${SECONDS}s" ;;
  *) echo "usage: bash benchmarks/scale.sh curves|precision|speed|resume|lora|fsdp7b|save7b|resume7b"; exit 2 ;;
esac
