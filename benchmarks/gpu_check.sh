#!/usr/bin/env bash
# One GPU check of document attention, the loss and long blocks, ready to run on one H100/H200 (~8 minutes).
#
#     bash benchmarks/gpu_check.sh            # from the repository root
#
# Needs a CUDA PyTorch with transformers and peft already installed; no network. deepspeed and
# liger-kernel (with deepspeed's small dependencies, and optionally flash-attn) are installed from wheels
# placed in benchmarks/wheels/ beforehand, on a machine with network and the GPU machine's platform and
# Python (docs/attention_and_loss.md, "GPU check"):
#
#     pip wheel --no-deps -w benchmarks/wheels deepspeed==0.19.8
#     pip download -d benchmarks/wheels --only-binary=:all: --platform manylinux2014_x86_64 \
#         --python-version 3.11 liger-kernel einops hjson msgpack ninja py-cpuinfo pydantic psutil --no-deps
#     # (+ pydantic-core annotated-types typing-inspection when the GPU machine lacks them; + flash-attn)
#
# (a) document attention, flex and SDPA (and flash varlen with flash-attn) vs documents run alone, bf16;
# (b) chunked loss vs full logits, Liger vs chunked, bf16 (benchmarks/gpu_check.py);
# (c) benchmarks/gpu_mfu.py for 40 steps: tokens/s per GPU, MFU and peak memory with the chunked loss
#     and document attention (the defaults), without the chunked loss, and without document attention;
# (d) long blocks on one GPU: gpu_mfu.py at seq 8,192 and 32,768 (micro-batch 1, 4 documents per window,
#     document attention through the CUDA path: flash-attn 2 varlen when installed, else flex_attention;
#     gradient checkpointing at 32K), $GPU_CHECK_LONG_STEPS steps each: tokens/s, MFU, peak memory. A block
#     that runs out of GPU memory is skipped with one line; the rest of the check goes on.
# Sequence parallelism on 2 GPUs (not run here):
#     python benchmarks/gpu_mfu.py --num_gpus 2 --sequence_parallel_size 2 --seq 32768 --micro_batch 1 \
#         --document_length 8192 --steps 6 --warmup 2
# Every table is also written to gpu_check_results/ ; CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
OUT=${GPU_CHECK_OUT:-gpu_check_results}
STEPS=${GPU_CHECK_STEPS:-40}
LONG_STEPS=${GPU_CHECK_LONG_STEPS:-5}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DS_BUILD_OPS=0

python - <<'PY'
import importlib.util, sys, torch
missing = [name for name in ("transformers", "peft") if importlib.util.find_spec(name) is None]
if missing or not torch.cuda.is_available():
    sys.exit(f"gpu_check: needs CUDA torch with transformers and peft (missing: {missing}, cuda: {torch.cuda.is_available()})")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
PY

for package in deepspeed liger_kernel; do
  if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$package') is None)"; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
      echo "installing $package from $WHEELS"
      # Dependencies come from the same folder or from what is installed (torch, numpy, ...); pip names
      # any that are missing.
      pip install --no-index --find-links "$WHEELS" "${package//_/-}"
    else
      echo "gpu_check: $package is missing and $WHEELS holds no wheels (see the header of this script)" >&2
      exit 2
    fi
  fi
done
if ls "$WHEELS"/flash_attn-*.whl >/dev/null 2>&1 && ! python -c "import flash_attn" 2>/dev/null; then
  pip install --no-index --find-links "$WHEELS" --no-deps flash-attn
fi

status=0
echo "== (a) + (b): document attention paths and the loss, bf16"
python benchmarks/gpu_check.py --json "$OUT/gpu_check.json" | tee "$OUT/gpu_check.md" || status=1

echo "== (c) gpu_mfu.py, $STEPS steps each (1B LLaMA-3 shape, seq 2048, 1,024-token documents)"
run_mfu() {
  local name=$1; shift
  python benchmarks/gpu_mfu.py --steps "$STEPS" --warmup 8 --document_length 1024 --timeout 300 "$@" \
    | tee "$OUT/mfu_$name.md" || status=1
}
run_mfu chunked_documents
run_mfu full_logits_documents --loss_chunk_size 0
run_mfu chunked_no_documents --document_attention false
if python -c "import liger_kernel" 2>/dev/null; then
  echo "(use_liger_kernel is a run-config field; gpu_mfu.py runs the chunked loss)"
fi

echo "== (d) long blocks on one GPU, $LONG_STEPS steps each (micro-batch 1, 4 documents per window)"
long_args=()
if python -c "import flash_attn" 2>/dev/null; then
  long_args=(--flash)  # flash-attn 2 varlen; without it document attention runs through flex_attention
fi
run_long() {
  local seq=$1; shift
  local code=0
  # Short: the first steps include flex_attention's compilation; the window is the last $((LONG_STEPS - 2)).
  { python benchmarks/gpu_mfu.py --num_gpus 1 --steps "$LONG_STEPS" --warmup 2 --micro_batch 1 --seq "$seq" \
      --document_length $((seq / 4)) --timeout 240 ${long_args[@]+"${long_args[@]}"} "$@" 2>&1 | tee "$OUT/long_$seq.md"; } || code=$?
  if [ "$code" -eq 3 ]; then
    echo "long block $seq: skipped (out of GPU memory; see $OUT/long_$seq.md)" | tee -a "$OUT/long_$seq.md"
  elif [ "$code" -ne 0 ]; then
    status=1
  fi
}
run_long 8192
run_long 32768 --gradient_checkpointing

echo "== summary (also in $OUT/)"
for file in "$OUT"/mfu_*.md "$OUT"/long_*.md; do
  [ -f "$file" ] || continue
  echo "-- $(basename "$file" .md)"
  grep -h -E "^\| (tokens/s per GPU|MFU, |peak memory per GPU)|^long block .*skipped" "$file" || true
done
exit $status
