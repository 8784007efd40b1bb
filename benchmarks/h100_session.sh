# The GPU runs behind BENCHMARKS.md's correctness, distillation-throughput and quality figures, as two calls on one
# warm H100 (one call carries at most 64 MiB, the SmolLM2 GGUF is 98 MB, so it travels in two halves):
#   bash benchmarks/h100_session.sh first    # carry .whl .gguf1: wheels, first half, GPU tests, distillation MFU
#   bash benchmarks/h100_session.sh second   # carry .gguf2 corpus: join the GGUF, real-teacher GPU test, quality
# and, each in one call of its own:
#   bash benchmarks/h100_session.sh tests      # carry .whl: the whole GPU test file, with a 9-minute budget
#   bash benchmarks/h100_session.sh multi_gpu  # carry .whl, on nvidia-h200-x2: one process vs DDP vs FSDP
# Results land in $OUT (default ./gpu_out). Wheels: fla 0.6.0, gguf 0.19.0, datasets 5.2.0 and their pure-Python needs.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$OUT/device.txt"

case "$1" in
first)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  cp .gguf1/part00 /tmp/part00
  timeout 220 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "not real_teacher" > "$OUT/gpu_tests.log" 2>&1
  echo "exit $?" >> "$OUT/gpu_tests.log"
  timeout 300 python3 benchmarks/train_speed.py --mixer hedgehog --out /tmp/train_speed > "$OUT/train_speed.log" 2>&1
  echo "exit $?" >> "$OUT/train_speed.log"
  cp /tmp/train_speed/train_speed.json /tmp/train_speed/distill.log "$OUT/" 2>/dev/null
  ;;
second)
  cat /tmp/part00 .gguf2/part01 > /tmp/smollm2.gguf
  echo "$(cat .gguf2/sha256)  /tmp/smollm2.gguf" | sha256sum -c > "$OUT/sha256.txt" 2>&1 || exit 1
  export LINEARIZE_SMOLLM2_GGUF=/tmp/smollm2.gguf
  timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "real_teacher and (gated_deltanet or mamba2)" > "$OUT/gpu_real_teacher.log" 2>&1
  echo "exit $?" >> "$OUT/gpu_real_teacher.log"
  timeout 430 python3 benchmarks/quality.py --teacher /tmp/smollm2.gguf --corpus corpus --tokens "${TOKENS:-400000}" \
    --recipes lolcats,mamba_in_llama,liger,hybrid_gdn,lolcats_linear --out /tmp/quality > "$OUT/quality.log" 2>&1
  echo "exit $?" >> "$OUT/quality.log"
  cp /tmp/quality/quality.json "$OUT/" 2>/dev/null
  for run in /tmp/quality/*/; do
    name=$(basename "$run"); mkdir -p "$OUT/quality/$name"
    cp "$run"/*.json "$run"/*.jsonl "$run"/*.md "$OUT/quality/$name/" 2>/dev/null
  done
  ;;
tests)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  timeout 540 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "not real_teacher" -rs > "$OUT/gpu_tests.log" 2>&1
  echo "exit $?" >> "$OUT/gpu_tests.log"
  ;;
multi_gpu)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  timeout 540 python3 benchmarks/multi_gpu.py --out /tmp/multi_gpu > "$OUT/multi_gpu.log" 2>&1
  echo "exit $?" >> "$OUT/multi_gpu.log"
  cp /tmp/multi_gpu/multi_gpu.json /tmp/multi_gpu/*.log "$OUT/" 2>/dev/null
  ;;
*)
  echo "usage: bash benchmarks/h100_session.sh first|second|tests|multi_gpu" >&2; exit 2
  ;;
esac
