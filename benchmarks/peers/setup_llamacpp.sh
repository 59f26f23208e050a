#!/usr/bin/env bash
# Create benchmarks/.venv-llamacpp: llama.cpp as its Python users install it, `pip install
# 'llama-cpp-python[server]'` (the registry has only the source distribution, so pip builds llama.cpp with
# CMake for this CPU), plus llama.cpp's own HF -> GGUF converter and gguf-py taken from that same source
# distribution (the converter is not part of the wheel; users run it from a llama.cpp checkout).
#
#   bash benchmarks/peers/setup_llamacpp.sh [VERSION]     # default 0.3.36
set -euo pipefail
VERSION=${1:-0.3.36}
root=$(cd "$(dirname "$0")/../.." && pwd)
venv="$root/benchmarks/.venv-llamacpp"
PY=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# GGML_NATIVE: build for this machine's CPU (AVX2 here), as a local pip build does by default.
CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} CMAKE_ARGS="-DGGML_NATIVE=ON" \
    "$venv/bin/python" -m pip install -q "llama-cpp-python[server]==$VERSION"
# The converter and gguf-py of the same llama.cpp revision, from the source distribution pip used.
src="$venv/src"
mkdir -p "$src"
"$venv/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$src"
tar -xzf "$src/llama_cpp_python-$VERSION.tar.gz" -C "$src" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" 2>/dev/null || \
tar -xzf "$src/llama_cpp_python-$VERSION.tar.gz" -C "$src" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
ln -sfn "$src/llama_cpp_python-$VERSION/vendor/llama.cpp" "$src/llama.cpp"
# The converter's own requirements: torch (CPU wheel: pinned, an unpinned torch pulls CUDA), transformers,
# safetensors, sentencepiece; gguf-py from the same revision.
"$venv/bin/python" -m pip install -q "torch==2.13.0" "transformers>=4.45,<4.58" safetensors sentencepiece numpy \
    "$src/llama.cpp/gguf-py" openai
"$venv/bin/python" - <<'PY'
import importlib.metadata as m
for p in ("llama_cpp_python", "gguf", "torch", "transformers", "uvicorn", "fastapi"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "absent")
PY
echo "converter: $src/llama.cpp/convert_hf_to_gguf.py"
