"""One import root: every stage folder (and each subpackage) installs under llama3_deploy, nothing else does."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("export", "runtime", "calibration", "benchmarks", "server")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_stage_package_is_mapped_under_the_root():
    st = _setuptools()
    on_disk = {"llama3_deploy"} | {
        "llama3_deploy." + ".".join(p.parent.relative_to(ROOT).parts)
        for stage in STAGES for p in (ROOT / stage).rglob("__init__.py")
        if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)}  # not benchmarks/.venv-*
    assert set(st["packages"]) == on_disk  # benchmarks.peers included; no top-level export/runtime/...
    for name in on_disk - {"llama3_deploy"}:
        assert st["package-dir"][name] == name.removeprefix("llama3_deploy.").replace(".", "/")


def test_imports_work_from_an_unrelated_directory_with_a_runtime_folder(tmp_path):
    """A user's working directory with its own runtime/ folder must not shadow the installed package."""
    (tmp_path / "runtime").mkdir()
    code = ("from llama3_deploy.runtime import Generator, SamplingParams; from llama3_deploy import Generator as G; "
            "import llama3_deploy.export.spec, llama3_deploy.benchmarks.peers.artifacts; assert G is Generator")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_importing_the_root_loads_no_stage():
    code = "import sys, llama3_deploy; assert 'llama3_deploy.runtime' not in sys.modules and 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, check=True)
