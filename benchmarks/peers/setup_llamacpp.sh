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
# Build for this machine's CPU features, except AMX: this VM advertises AMX (amx_tile/amx_int8) but faults on its
# first tile load (SIGILL in ggml_backend_amx_mul_mat with GGML_NATIVE=ON, -march=native), so the build names
# the x86 features explicitly (AVX2/FMA/F16C and AVX-512 with VNNI/BF16, which do run) and turns AMX off.
CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON"
if grep -q avx512f /proc/cpuinfo; then
    CPU_FLAGS="$CPU_FLAGS -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
fi
CPU_FLAGS="$CPU_FLAGS -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} CMAKE_ARGS="${CMAKE_ARGS:-$CPU_FLAGS}" \
    "$venv/bin/python" -m pip install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$VERSION"
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
# The benchmark worker runs in this venv as `python -m llama3_deploy.benchmarks.worker` (engine kind llamacpp):
# the project itself, without its dependencies.
"$venv/bin/python" -m pip install -q --no-deps -e "$root"
"$venv/bin/python" - <<'PY'
import importlib.metadata as m
for p in ("llama_cpp_python", "gguf", "torch", "transformers", "uvicorn", "fastapi"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "absent")
PY
echo "converter: $src/llama.cpp/convert_hf_to_gguf.py"
