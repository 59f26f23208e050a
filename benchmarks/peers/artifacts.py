"""What each engine loads, built from one checkpoint with each engine's own tool, cached in a work directory.

- the checkpoint: Hugging Face safetensors with seeded random weights (`random:PRESET`), or a given dir;
- this project: `llama3-deploy export` (validated ONNX decoder), one per precision;
- Optimum: `optimum-cli export onnx --task text-generation-with-past` (main environment);
- llama.cpp: llama.cpp's own converter (`convert_hf_to_gguf.py`, from the llama-cpp-python source distribution
  benchmarks/peers/setup_llamacpp.sh unpacks) to a GGUF at f32/f16/bf16/q8_0, and q4_0 by llama.cpp's own
  quantizer (`llama_model_quantize` through llama-cpp-python) from the f16 GGUF. The converter needs the
  checkpoint's tokenizer (it recognises Llama 3's pre-tokenizer by hash), so random checkpoints get the real
  Llama 3 tokenizer files from a directory the caller names;
- onnxruntime-genai: its model builder, `python -m onnxruntime_genai.models.builder`, run by the Python
  of its own virtual environment (benchmarks/peers/setup_genai.sh). The builder insists on a tokenizer,
  which random checkpoints lack, so it reads a directory of links to the checkpoint plus a minimal
  word-level tokenizer (token ids are what the benchmark feeds; the tokenizer is never used).

Every build runs as a child process (so the bench process stays small) under a memory watchdog (memwatch.py),
and reports its command, time and peak memory; one that runs out of memory is stopped and reported as such.
An artifact whose directory holds a `.complete` marker is reused.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .memwatch import run_watched

MARK = ".complete"


class BuildError(RuntimeError):
    """A build that did not finish; `memory` holds its figures (peak RSS, out of memory) when it ran at all."""

    def __init__(self, message: str, *, memory: dict | None = None):
        super().__init__(message)
        self.memory = memory


def _run(cmd: list[str], out: Path, *, what: str, log: Path, env: dict | None = None) -> dict:
    """Run a build command into `out` (removed first), logging to `log`, under the memory watchdog; mark it
    complete. The build's peak memory is part of what it returns (and of the marker)."""
    if out.exists():
        shutil.rmtree(out)
    w = run_watched(cmd, log=log, env=env)
    memory = w.to_json()
    if w.oom or w.returncode != 0 or not out.is_dir():
        tail = log.read_text(errors="replace")[-1500:]
        head = w.oom or f"exit {w.returncode}"
        raise BuildError(f"{what} failed ({head}; peak RSS {memory['peak_rss_gib']} GiB): {' '.join(cmd)}\n{tail}",
                         memory=memory)
    (out / MARK).write_text(json.dumps({"command": cmd, "seconds": w.seconds, "memory": memory}))
    return {"path": str(out), "command": " ".join(cmd), "seconds": round(w.seconds, 1), "cached": False,
            "memory": memory}


def _cached(out: Path) -> dict | None:
    if (out / MARK).is_file():
        info = json.loads((out / MARK).read_text())
        return {"path": str(out), "command": " ".join(info["command"]), "seconds": round(info["seconds"], 1),
                "cached": True, "memory": info.get("memory")}
    return None


def checkpoint(model: str, work: Path, *, dtype: str, seed: int = 0) -> dict:
    """A checkpoint directory: `model` itself, or seeded random weights for `random:PRESET` in `dtype`."""
    if not model.startswith("random:"):
        if not Path(model).is_dir():
            raise BuildError(f"checkpoint directory not found: {model}")
        return {"path": str(Path(model).resolve()), "command": None, "seconds": 0.0, "cached": True,
                "weights": "as given"}
    preset = model[len("random:"):]
    out = work / f"ckpt-{preset}-{dtype}-seed{seed}"
    info = _cached(out) or _run([sys.executable, "-m", "llama3_deploy.benchmarks.make_checkpoint", "--preset", preset,
                                 "--output", str(out), "--seed", str(seed), "--dtype", dtype, "--overwrite"],
                                out, what="random checkpoint", log=work / f"{out.name}.log")
    info["weights"] = f"seeded random (seed {seed}), {dtype}"
    return info


# This project's export variants by benchmark name: portable graphs by dtype, optimized ones prefixed "opt-".
# The quantized ones use onnxruntime-genai's CPU defaults (symmetric, block 32, accuracy level 4, the head
# quantized too), so "same precision" compares like with like.
# On CUDA (opt-float16-int4) genai's default accuracy level is 0 (the kernel's own), hence --accuracy-level 0.
# The fp16 variants are the CUDA ones: they return greedy ids from the graph (--argmax), so a decode step copies
# B ids to the host instead of B x V logits.
_Q = ["--flavor", "optimized", "--symmetric", "--block-size", "32"]
EXPORT_VARIANTS = {  # name -> (activation / KV dtype, export arguments)
    "float32": ("float32", []), "float16": ("float16", []), "bfloat16": ("bfloat16", []),
    "opt-float32": ("float32", ["--flavor", "optimized"]),
    "opt-float16": ("float16", ["--flavor", "optimized", "--argmax"]),
    "opt-int8": ("float32", [*_Q, "--quantize", "int8"]),
    "opt-int4": ("float32", [*_Q, "--quantize", "int4"]),
    "opt-float16-int4": ("float16", [*_Q, "--quantize", "int4", "--accuracy-level", "0", "--argmax"]),
}


def variant_dtype(variant: str) -> str:
    """The activation/KV dtype of an export variant."""
    return EXPORT_VARIANTS[variant][0]


def ours(ckpt: str, work: Path, *, variant: str) -> dict:
    """This project's validated ONNX export of the checkpoint, one of EXPORT_VARIANTS."""
    if variant not in EXPORT_VARIANTS:
        raise BuildError(f"unknown export variant {variant!r}; known: {', '.join(EXPORT_VARIANTS)}")
    out = work / f"ort-{variant}"
    cmd = [sys.executable, "-m", "llama3_deploy", "export", "--model", ckpt, "--output", str(out),
           "--dtype", variant_dtype(variant), *EXPORT_VARIANTS[variant][1], "--overwrite"]
    return _cached(out) or _run(cmd, out, what="llama3-deploy export", log=work / f"{out.name}.log")


def optimum(ckpt: str, work: Path, *, dtype: str, device: str = "cpu") -> dict:
    """Optimum's ONNX export (text-generation-with-past) of the checkpoint."""
    out = work / f"optimum-{dtype}"
    cli = shutil.which("optimum-cli") or "optimum-cli"
    cmd = [cli, "export", "onnx", "--model", ckpt, "--task", "text-generation-with-past"]
    if dtype == "float16":
        cmd += ["--dtype", "fp16"]
    if device.startswith("cuda"):
        cmd += ["--device", "cuda"]
    return _cached(out) or _run(cmd + [str(out)], out, what="optimum-cli export onnx", log=work / f"{out.name}.log")


def _link_checkpoint(ckpt: Path, dest: Path) -> Path:
    """A fresh directory of links to the checkpoint's files, for a tool that wants files added beside them."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.is_file() and not f.name.startswith("."):
            os.symlink(f.resolve(), dest / f.name)
    return dest


def _genai_input(ckpt: Path, dest: Path) -> Path:
    """Links to the checkpoint's files plus a minimal tokenizer the genai builder can load."""
    _link_checkpoint(ckpt, dest)
    cfg = json.loads((ckpt / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    eos = eos[-1] if isinstance(eos, list) else eos
    bos = cfg.get("bos_token_id")
    specials = {i for i in (bos, eos) if i is not None}
    unk = min(set(range(len(specials) + 1)) - specials)
    # The model's own BOS/EOS ids, so the builder adds no foreign id to genai_config's EOS list.
    vocab = {"<unk>": unk, "<|begin_of_text|>": bos if bos is not None else unk + 1,
             "<|eot_id|>": eos if eos is not None else unk + 2}
    (dest / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "unk_token": "<unk>"}))
    return dest


def genai(ckpt: str, work: Path, *, dtype: str, python: str, device: str = "cpu") -> dict:
    """onnxruntime-genai's model builder output for the checkpoint, built in the genai venv.

    dtype is float32/float16/bfloat16, or int8/int4 for its weight-only quantized builds (its defaults)."""
    if not Path(python).is_file():
        raise BuildError(f"onnxruntime-genai environment not found ({python}); create it with "
                         "`bash benchmarks/peers/setup_genai.sh`")
    out = work / f"genai-{dtype}-{device.split(':')[0]}"
    cached = _cached(out)
    if cached:
        return cached
    src = _genai_input(Path(ckpt), work / "genai-input")
    precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8", "int4": "int4"}[dtype]
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", precision,
           "-e", "cuda" if device.startswith("cuda") else "cpu", "-c", str(work / "genai-cache")]
    return _run(cmd, out, what="onnxruntime-genai model builder", log=work / f"{out.name}.log")


GGUF_PRECISIONS = ("f32", "f16", "bf16", "q8_0", "q4_0")
GGUF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_QUANTIZE = """import sys, llama_cpp as lc
p = lc.llama_model_quantize_default_params()
p.ftype = lc.LLAMA_FTYPE_MOSTLY_Q4_0
p.nthread = 0
sys.exit(lc.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def _gguf_input(ckpt: Path, dest: Path, tokenizer: Path | None) -> Path:
    """Links to the checkpoint's files, plus the tokenizer files it lacks from `tokenizer`."""
    _link_checkpoint(ckpt, dest)
    if not (dest / "tokenizer.json").exists():
        if tokenizer is None or not (tokenizer / "tokenizer.json").is_file():
            raise BuildError(f"llama.cpp's converter needs the checkpoint's tokenizer; {ckpt} has none: pass "
                             "--tokenizer DIR (e.g. ../shared/llama3/tokenizer)")
        for name in GGUF_TOKENIZER_FILES:
            if (tokenizer / name).is_file() and not (dest / name).exists():
                os.symlink((tokenizer / name).resolve(), dest / name)
    return dest


def llamacpp(ckpt: str, work: Path, *, precision: str, python: str, tokenizer: str | Path | None = None) -> dict:
    """A GGUF of the checkpoint at `precision` (GGUF_PRECISIONS), made with llama.cpp's own tools in their venv;
    the returned path is the .gguf file."""
    if precision not in GGUF_PRECISIONS:
        raise BuildError(f"unknown GGUF precision {precision!r}; known: {', '.join(GGUF_PRECISIONS)}")
    converter = Path(python).parent.parent / "src" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not Path(python).is_file() or not converter.is_file():
        raise BuildError(f"llama.cpp environment not found ({python}, {converter}); create it with "
                         "`bash benchmarks/peers/setup_llamacpp.sh`")
    out = work / f"gguf-{precision}"
    info = _cached(out)
    if info is None:
        gguf = out / "model.gguf"
        if precision == "q4_0":  # llama.cpp quantizes q4_0 from an f16 GGUF, as its users do with llama-quantize
            f16 = llamacpp(ckpt, work, precision="f16", python=python, tokenizer=tokenizer)["path"]
            script = f"mkdir -p {shlex.quote(str(out))} && exec {shlex.quote(python)} -c {shlex.quote(_QUANTIZE)} " \
                     f"{shlex.quote(f16)} {shlex.quote(str(gguf))}"
        else:
            src = _gguf_input(Path(ckpt), work / "gguf-input", Path(tokenizer) if tokenizer else None)
            script = (f"mkdir -p {shlex.quote(str(out))} && exec {shlex.quote(python)} {shlex.quote(str(converter))} "
                      f"{shlex.quote(str(src))} --outtype {precision} --outfile {shlex.quote(str(gguf))}")
        info = _run(["bash", "-c", script], out, what=f"llama.cpp GGUF ({precision})",
                    log=work / f"{out.name}.log")
    return {**info, "path": str(out / "model.gguf")}


def venv_versions(python: str, packages: tuple[str, ...]) -> dict:
    """Package versions inside another environment, asked of its own Python."""
    code = ("import importlib.metadata as m, json, sys\nout = {'python': sys.version.split()[0]}\n"
            f"for p in {list(packages)!r}:\n    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    try:
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120).stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return {}
