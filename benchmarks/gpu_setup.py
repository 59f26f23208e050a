"""Plumbing of the GPU check (benchmarks/gpu.py): the log, the prepare phase's status file, installing ONNX
Runtime's CUDA build from the staged wheel parts, pausing the background preparation
while timings run, and what the results record about the machine and the versions."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

PACKAGES = ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxruntime-gpu", "numpy",
            "safetensors", "tokenizers", "ml_dtypes", "matplotlib", "setuptools", "llama3-deploy")


class Log:
    """Lines stamped with the seconds since the phase started, to a file (appended) and stdout."""

    def __init__(self, path: Path):
        self.t0 = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.file = path, open(path, "a")

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} {time.perf_counter() - self.t0:6.1f} s] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def write_json(path: Path, doc: dict) -> None:
    """Atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (finished, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def prepare_state(work: Path) -> dict:
    """The prepare processes' status files (prepare-status-*.json) merged: every step's state, and which
    processes still run (a status that says running with a dead pid is a killed run)."""
    files = {p.name: read_json(p) for p in sorted(Path(work).glob("prepare-status*.json"))}
    steps, running = {}, []
    for st in files.values():
        steps.update(st.get("steps", {}))
        if st.get("state") in ("running", "waiting") and alive(st.get("pid")):  # waiting: for its child
            running.append({"pid": st["pid"], "current": st.get("current"), "state": st["state"]})
    return {"state": "running" if running else ("done" if files else "absent"), "steps": steps,
            "running": running, "processes": {name: {k: st.get(k) for k in ("pid", "state", "started", "finished",
                                                                          "command")}
                                              for name, st in files.items()}}


@contextlib.contextmanager
def pause_prepare(work: Path, log):
    """SIGSTOP the background prepare processes that still run (e.g. the INT4 export) while timings run, so
    their CPU load does not perturb the host-driven token loop; SIGCONT after."""
    paused = [r for r in prepare_state(work)["running"] if r["pid"] != os.getpid() and r["state"] == "running"]
    for r in paused:
        os.kill(r["pid"], signal.SIGSTOP)
        log(f"paused the prepare process {r['pid']} (step {r['current']}) while timings run")
    try:
        yield bool(paused)
    finally:
        for r in paused:
            os.kill(r["pid"], signal.SIGCONT)
            log(f"resumed the prepare process {r['pid']}")


def install_staged_wheel(root: Path, site: Path, log) -> dict:
    """Join the wheel parts the stage script wrote (root/part-*/ort-gpu.NN), name the wheel from its own
    dist-info (name, version, first tag), `pip install --no-index --no-deps --target site`, and put site first
    on sys.path. Call before anything imports onnxruntime."""
    parts = sorted(root.glob("part-*/ort-gpu.*"), key=lambda p: p.name)
    info: dict = {"parts": [str(p) for p in parts], "site": str(site)}
    if "onnxruntime" in sys.modules:
        info["warning"] = "onnxruntime was imported before the install: this process keeps that build"
    stamp = site / ".installed-from-parts"
    if stamp.is_file():  # a rerun on the same warm machine
        info["installed"], info["wheel"] = "already there", stamp.read_text().strip()
    elif not parts:
        info["installed"] = False
        info["reason"] = f"no staged parts under {root} (run ../shared/device/stage-ort-gpu.sh and carry them)"
        return info
    else:
        t0 = time.perf_counter()
        blob = root / "ort-gpu.joined"
        with open(blob, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        with zipfile.ZipFile(blob) as z:
            wheel_meta = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL") and n.count("/") == 1)
            dist = wheel_meta.split("/")[0][: -len(".dist-info")]
            tag = next(line.split(":", 1)[1].strip() for line in z.read(wheel_meta).decode().splitlines()
                       if line.startswith("Tag:"))
        wheel = root / f"{dist}-{tag}.whl"
        os.replace(blob, wheel)
        log(f"joined {len(parts)} parts into {wheel.name} ({wheel.stat().st_size / 2**20:.0f} MiB); installing")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--target", str(site), str(wheel)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        info.update(command=" ".join(cmd), seconds=round(time.perf_counter() - t0, 1), returncode=proc.returncode)
        if proc.returncode:
            info["installed"] = False
            info["reason"] = (proc.stderr or proc.stdout)[-2000:]
            return info
        info["installed"], info["wheel"] = True, wheel.name
        stamp.write_text(wheel.name + "\n")
        wheel.unlink(missing_ok=True)  # 244 MiB the disk needs more for the exports
    sys.path.insert(0, str(site))
    return info


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    import onnxruntime as ort
    out["onnxruntime (imported)"] = f"{ort.__version__} from {Path(ort.__file__).parent}"
    out["onnxruntime providers"] = ort.get_available_providers()
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        out["torch cuda"] = torch.version.cuda
    return out


def machine(device: str) -> dict:
    cpu = "?"
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "?")
    info = {"cpu": f"{cpu}, {os.cpu_count()} cores", "platform": sys.platform}
    if device.startswith("cuda"):
        import torch
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count)
        with contextlib.suppress(Exception):
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    return info


def source_digest() -> dict:
    """Which code ran: the git commit where there is one (not on the device: the tree travels without .git)
    and a digest of the package's Python sources either way."""
    import llama3_deploy
    root = Path(llama3_deploy.__file__).resolve().parent.parent
    h = hashlib.sha256()
    for d in ("llama3_deploy", "runtime", "export", "benchmarks", "calibration"):
        for p in sorted((root / d).rglob("*.py")):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    return {"git_commit": commit or None, "sources_sha256": h.hexdigest()[:16]}
