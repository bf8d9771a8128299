#!/usr/bin/env bash
# The GPU check, in one call on the lent GPU machine (about 10 minutes): for each anchor shape
# (Qwen2.5-0.5B-like batch 8, Llama-3.2-1B-like batch 4, seq 2048, bf16, AdamW), the
# same-card baseline ../shared/bench/jax_ref.py, then coach_jax unpacked and packed
# (real-length examples); then a LoRA and a QLoRA step on the Llama-1B shape, Gemma 3 1B's
# shape (262k vocabulary),
# Qwen3-30B-A3B's mixture-of-experts layers cut to 4, Qwen3.5-0.8B's hybrid DeltaNet shape
# (unpacked and packed), and the cuDNN test. Results go to $OUT/gpu_check.jsonl;
# `python scripts/gpu_report.py $OUT` turns them into rows of docs/benchmarks.md.
#
# Before the call, on this machine (only the checkout travels):
#   mkdir -p .bench && cp -r ../shared/bench .bench/shared-bench
#   echo /.whl/ >> .git/info/exclude && mkdir -p .whl && cp ../shared/wheels-gpu/*.whl .whl/
# The call: carry [".whl", ".bench"], command "bash scripts/gpu_check.sh".
set -u -o pipefail
OUT=${OUT:-/tmp/gpu_check}
PER_CMD_S=${PER_CMD_S:-100}
mkdir -p "$OUT"
JSONL=$OUT/gpu_check.jsonl
: > "$JSONL"
python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
# The cuDNN version tests/test_lowering.py pins for CUDA lowerings (CUDNN_VERSION).
python3 -c "from coach_jax.models import attention; print('cudnn', attention.cudnn_version())" \
  | tee -a "$OUT/card.txt"

run() {  # run LABEL CMD...: keep the command's last JSON line, tagged with LABEL
  local label=$1; shift
  local line
  line=$(timeout "$PER_CMD_S" "$@" 2>>"$OUT/stderr.log" | grep '^{' | tail -1)
  if [ -n "$line" ]; then
    echo "{\"run\": \"$label\", \"result\": $line}" | tee -a "$JSONL"
  else
    echo "{\"run\": \"$label\", \"result\": null}" | tee -a "$JSONL"
  fi
}

for spec in "qwen0.5b 8" "llama1b 4"; do
  set -- $spec
  run "jax_ref $1" python3 .bench/shared-bench/jax_ref.py --preset "$1" --batch "$2" --seq 2048
  run "coach_jax $1" python3 scripts/benchmark.py --preset "$1" --batch "$2" --seq 2048
  run "coach_jax $1 packed" python3 scripts/benchmark.py --preset "$1" --batch "$2" \
    --seq 2048 --packed
done
# LoRA and QLoRA (rank 16, all-linear; NF4 base) on the Llama-1B shape.
run "coach_jax llama1b lora16" python3 scripts/benchmark.py --preset llama1b --batch 4 \
  --seq 2048 --lora_rank 16
run "coach_jax llama1b qlora16 nf4" python3 scripts/benchmark.py --preset llama1b --batch 4 \
  --seq 2048 --lora_rank 16 --quantize nf4
# Gemma 3 1B's shape: 262k vocabulary (chunked cross-entropy), alternating windows.
run "coach_jax gemma3_1b" python3 scripts/benchmark.py --preset gemma3_1b --batch 4 --seq 2048
# Mixture of experts: Qwen3-30B-A3B's layer (128 experts, top 8), 4 of its 48 layers.
run "coach_jax qwen3_30b_a3b 4 layers" python3 scripts/benchmark.py --preset qwen3_30b_a3b \
  --layers 4 --batch 4 --seq 2048
# Qwen3.5-0.8B's shape: Gated DeltaNet (chunked rule) and gated attention, scanned in groups.
run "coach_jax qwen3_5_0_8b" python3 scripts/benchmark.py --preset qwen3_5_0_8b --batch 4 \
  --seq 2048
run "coach_jax qwen3_5_0_8b packed" python3 scripts/benchmark.py --preset qwen3_5_0_8b \
  --batch 4 --seq 2048 --packed
python3 -m pytest -q tests/test_attention.py -k cudnn 2>&1 | tail -2 | tee "$OUT/cudnn_test.txt"
