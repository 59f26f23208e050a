#!/usr/bin/env bash
# Create benchmarks/.venv-genai: onnxruntime-genai installed as its users install it (pip, from PyPI),
# plus what its model builder needs (torch CPU wheel, transformers). Kept apart from the main
# environment because onnxruntime-genai pins its own onnxruntime.
#
#   bash benchmarks/peers/setup_genai.sh [GENAI_VERSION]     # default 0.18.0
set -euo pipefail
VERSION=${1:-0.18.0}
root=$(cd "$(dirname "$0")/../.." && pwd)
venv="$root/benchmarks/.venv-genai"
PY=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch==2.13.0 resolves to the local CPU wheel (find-links); an unpinned torch pulls the CUDA build.
# The 0.18 builder imports model classes only transformers 5.x has (our main env pins <4.58).
"$venv/bin/python" -m pip install -q "onnxruntime-genai==$VERSION" "torch==2.13.0" "transformers>=5" \
    onnx onnx-ir safetensors numpy
# The benchmark worker runs in this venv as `python -m llama3_deploy.benchmarks.worker`: the project itself,
# without its dependencies (they would replace the onnxruntime that onnxruntime-genai pins).
"$venv/bin/python" -m pip install -q --no-deps -e "$root"
"$venv/bin/python" - <<'PY'
import importlib.metadata as m
for p in ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "torch", "transformers"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "absent")
PY
