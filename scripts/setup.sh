#!/usr/bin/env bash
# Create .venv, install requirements.txt into it: this package (editable) with every extra, as the
# tests and notebooks need (pyproject.toml declares them). Safe to re-run: it does nothing when
# nothing it installs has changed since the last time.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
PY=.venv/bin/python
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

echo "setting up .venv (first run only; pip's output goes to .venv/pip.log)"
pip_install() {
  if ! $PY -m pip install --disable-pip-version-check "$@" >> .venv/pip.log 2>&1; then
    tail -n 30 .venv/pip.log >&2
    echo "error: pip install $* failed (full log: .venv/pip.log)" >&2
    exit 1
  fi
}
pip_install --upgrade pip
if ! $PY -m pip show torch > /dev/null 2>&1; then
  echo "  installing PyTorch (${TORCH_SPEC:-torch==2.13.0}) ..."
  pip_install "${TORCH_SPEC:-torch==2.13.0}"
fi
# Pin the torch that is there, so no other package swaps it for a different (multi-GB CUDA) build.
torch_version=$($PY -m pip show torch | awk '/^Version:/ {print $2}')
echo "  installing lm_pretrain with all its extras (requirements.txt; torch $torch_version kept) ..."
pip_install -r requirements.txt "torch==$torch_version"
# litdata asks for torchvision without a version. A torchvision built for another torch (e.g. a
# CUDA wheel beside a CPU torch) breaks `import lightning`; litdata itself only needs it for images.
if ! $PY -c "import torchvision" > /dev/null 2>&1; then
  $PY -m pip uninstall --yes torchvision >> .venv/pip.log 2>&1
fi
# The notebooks' kernel: this .venv, under the name the notebooks ask for, so Jupyter picks it. (Not
# a reason to stop the set-up: a home folder that cannot be written leaves the choice to the user.)
if ! $PY -m ipykernel install --user --name lm-pretrain --display-name "Python (lm-pretrain)" >> .venv/pip.log 2>&1; then
  echo "note: the notebooks' kernel could not be registered (.venv/pip.log); choose .venv/bin/python in Jupyter" >&2
fi
$PY -c "import lightning, litdata, tiktoken, torchmetrics, lm_pretrain"
echo "$want" > "$stamp"
echo "set-up done"
