#!/usr/bin/env bash
# Fresh-machine setup: a venv in .venv with the CPU build of torch and this package (editable).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Pin torch first: an unpinned torch (or one pulled in by diffusers) is a multi-GB CUDA build.
# torch==2.13.0 is the CPU wheel on this project's machines; override with TORCH_SPEC elsewhere.
.venv/bin/pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install -q --disable-pip-version-check -e ".[test,ray]"
# open-clip-torch is only needed for CLIP's BPE table (the real SD tokenizer, built offline);
# --no-deps skips its torchvision/timm dependencies, which this package never imports.
.venv/bin/pip install -q --disable-pip-version-check --no-deps "open-clip-torch>=2.20"
