"""Measure peak RSS and wall time of `llama3-deploy export` on a full-size checkpoint.

    python -m llama3_deploy.benchmarks.export_memory --checkpoint /tmp/llama3-8b-random --output /tmp/llama3-8b-onnx \
        --dtype float16 --result benchmarks/results/export-8b-fp16.json
    python -m llama3_deploy.benchmarks.export_memory --checkpoint random:meta-llama-3-70b-instruct \
        --output /tmp/70b-int4 --dtype float16 --result benchmarks/results/export-llama3-70b-int4.json --keep \
        -- --flavor optimized --quantize int4 --quantize-embedding

`--checkpoint` is anything `export --model` takes (a directory or random:PRESET); arguments after `--` go to
`llama3-deploy export` as they are.

The export runs as a child process; its peak RSS is the kernel's ru_maxrss for that child.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--result", required=True, help="JSON file to write")
    p.add_argument("--keep", action="store_true", help="keep the exported directory")
    p.add_argument("export_args", nargs="*", help="after --: more `llama3-deploy export` arguments")
    args = p.parse_args(argv)
    cmd = [sys.executable, "-m", "llama3_deploy", "export", "--model", args.checkpoint, "--output", args.output,
           "--dtype", args.dtype, "--overwrite", *args.export_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    from llama3_deploy.manifest import tool_versions
    out = Path(args.output)
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else None
    result = {
        "what": "peak RSS and wall time of llama3-deploy export on a full-size checkpoint with seeded random weights",
        "command": " ".join(cmd), "returncode": proc.returncode, "wall_s": round(wall, 1),
        "peak_rss_bytes": peak_kib * 1024, "peak_rss_gib": round(peak_kib / (1 << 20), 3),
        "checkpoint_bytes": dir_bytes(Path(args.checkpoint)) if Path(args.checkpoint).is_dir() else None,
        "output_bytes": dir_bytes(out) if out.exists() else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)},
        "versions": tool_versions(), "stdout": proc.stdout[-4000:], "stderr_tail": proc.stderr[-2000:],
        "manifest_validation": manifest.get("validation") if manifest else None,
        "manifest_timings": manifest.get("timings") if manifest else None,
        "weights": "seeded random (not trained)",
        "disk_free_after_bytes": shutil.disk_usage(out.parent).free if out.parent.exists() else None,
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2))
    print(proc.stdout)
    print(f"returncode {proc.returncode}, wall {wall:.1f} s, peak RSS {peak_kib / (1 << 20):.2f} GiB")
    if not args.keep and out.exists():
        shutil.rmtree(out)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
