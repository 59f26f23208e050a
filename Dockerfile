# llama3-deploy's OpenAI-compatible server on the CPU: a slim image with the `serve` extra only (no torch, no
# export stage), running `llama3-deploy serve` on an optimized-flavor export mounted at /model.
#
#   docker build -t llama3-deploy:cpu .
#   docker run --rm -p 8000:8000 -v /abs/path/to/llama3-8b-opt:/model:ro \
#       -e LLAMA3_DEPLOY_API_KEY=change-me --stop-timeout 40 llama3-deploy:cpu
#
# The served model id defaults to the export directory's name, which is `model` here: pass --served-model-name.
# Arguments after the image name replace CMD, so pass the whole set when changing one:
#   docker run ... llama3-deploy:cpu --model /model --host 0.0.0.0 --port 8000 --served-model-name llama3-8b --slots 16
# `docker stop` sends SIGTERM: the server drains in-flight requests for --drain-timeout (30 s by default), so give
# docker more than that (--stop-timeout 40 above; Docker's default is 10 s).
# GPU: Dockerfile.cuda beside this file (onnxruntime-gpu on an NVIDIA CUDA + cuDNN runtime base).
#
# PYTHON_IMAGE may name another Python 3.10+ image with `python3 -m venv` (a mirror, or a local base where
# Docker Hub cannot be reached).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the package is built from (.dockerignore keeps venvs, work-out, results and tests out as well).
COPY pyproject.toml README.md ./
COPY llama3_deploy/ llama3_deploy/
COPY export/ export/
COPY runtime/ runtime/
COPY calibration/ calibration/
COPY benchmarks/ benchmarks/
COPY server/ server/
# A venv, copied whole into the runtime stage: pip and the build tools stay behind in this stage.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir '.[serve]' \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# A fixed non-root uid/gid (10001), so a mounted export only needs to be readable by it (or world-readable).
RUN groupadd --system --gid 10001 llama \
    && useradd --system --uid 10001 --gid llama --home-dir /home/llama --create-home --shell /usr/sbin/nologin llama
COPY --from=build /opt/venv /opt/venv
# Numeric, so Kubernetes' runAsNonRoot can verify it without the image's /etc/passwd.
USER 10001:10001
WORKDIR /home/llama
EXPOSE 8000
# /health is public (no API key): 200 while the engine loop runs, 503 while draining. urllib, as slim has no curl.
# The long start period covers loading an 8B export.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["llama3-deploy", "serve"]
# 0.0.0.0 inside the container: a server bound to the container's 127.0.0.1 cannot be reached through a published
# port (-p). The CLI's own default stays 127.0.0.1; the host decides exposure with -p (e.g. -p 127.0.0.1:8000:8000).
CMD ["--model", "/model", "--host", "0.0.0.0", "--port", "8000"]
