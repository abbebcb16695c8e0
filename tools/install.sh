#!/usr/bin/env bash
# Creates or refreshes the virtual environment in $VENV (default .venv) with everything E3VA needs.
# Idempotent: `make` only calls it when the stamp file is older than this script or setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip

# Pinned: these builds lie on this kind of machine's disk; any other version is a multi-GB download.
"$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1

# Detectron2: keep an official build (one whose compiled _C loads) if the venv already has it;
# otherwise install sal-detectron2, upstream Detectron2's Python code in a wheel tagged for CPython 3.10.
if "$VPY" -c "import detectron2._C" 2>/dev/null; then
  echo "[install] keeping the official Detectron2 build already in $VENV"
elif ! "$VPY" -c "import importlib.metadata as m; m.version('sal-detectron2')" 2>/dev/null \
     || ! "$VPY" -c "import detectron2" 2>/dev/null; then
  PURELIB=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$VPY" -m pip install -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
    --upgrade --target "$PURELIB" sal-detectron2==0.7.2
  # The wheel ships a top-level `tools` package that would shadow this repository's tools/.
  rm -rf "$PURELIB/tools"
fi

# Detectron2's runtime dependencies (the wheel was installed with --no-deps), then ours.
"$VPY" -m pip install -q \
  'fvcore<0.1.6' 'iopath<0.1.11' 'omegaconf>=2.1,<2.4' 'hydra-core>=1.1,<1.4' 'pycocotools>=2.0.2' \
  'termcolor>=1.1' 'yacs>=0.1.8' 'tabulate' 'cloudpickle' 'tqdm>4.29' 'matplotlib>=3.5' 'packaging' \
  'setuptools<80' 'tensorboard>=2.10' 'timm>=1.0,<1.1' 'opencv-python-headless>=4.5' 'peft>=0.13,<0.22' \
  'pytest>=7' 'psutil>=5.9' 'onnx>=1.20,<1.24' 'onnxruntime>=1.22,<1.33'
"$VPY" -m pip install -q --no-deps --no-build-isolation -e .
"$VPY" -c "import detectron2, e3va; print('[install] detectron2', detectron2.__version__, '| e3va ready')"
