#!/usr/bin/env bash
# One GPU check of document attention and the loss, ready to run on one H100/H200 (at most ~8 minutes).
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
#     and document attention (the defaults), without the chunked loss, and without document attention.
# Every table is also written to gpu_check_results/ ; CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
OUT=${GPU_CHECK_OUT:-gpu_check_results}
STEPS=${GPU_CHECK_STEPS:-40}
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

echo "== summary (also in $OUT/)"
grep -h -E "^\| (tokens/s per GPU|MFU, cpt-ds|peak memory per GPU)" "$OUT"/mfu_*.md || true
exit $status
