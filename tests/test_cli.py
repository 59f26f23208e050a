"""The console commands (in-process) and the runtime's light import footprint."""
from __future__ import annotations

import json
import subprocess
import sys

from llama3_deploy.cli import main


def test_runtime_imports_no_torch():
    code = ("import sys, llama3_deploy.runtime, llama3_deploy.runtime.cli, llama3_deploy.cli; "
            "llama3_deploy.cli.build_parser(); "
            "bad = [m for m in ('torch', 'transformers', 'onnx', 'onnx_ir', 'llama3_deploy.export.pipeline') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# A runtime-only install (no torch, onnx, ...): simulated by blocking the extras' modules in a fresh interpreter.
_WITHOUT_EXTRAS = ("import sys\n"
                   "for m in ('torch', 'onnx', 'onnx_ir', 'onnxscript', 'safetensors', 'transformers', 'matplotlib',\n"
                   "          'fastapi', 'uvicorn', 'prometheus_client'):\n"
                   "    sys.modules[m] = None\n"
                   "from llama3_deploy.cli import main\n")


def _without_extras(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS + f"sys.exit(main({args!r}))"],
                          capture_output=True, text=True)


def test_runtime_only_install_names_the_extra_in_one_line():
    for command, extra in (("export", "export"), ("bench", "bench"), ("demo", "bench")):
        args = [command] + (["--model", "random:llama3-cpu-bench", "--output", "x"] if command == "export" else [])
        r = _without_extras(args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert f"pip install 'llama3-deploy[{extra}]'" in r.stderr and "torch" in r.stderr
    listing = _without_extras(["--help"]).stdout
    assert "[needs the export extra]" in listing and "[needs the bench extra]" in listing
    flat = " ".join(listing.split())
    # export, calibrate, bench, demo, build-engine, serve; generate/chat/tokens/inspect need nothing
    assert flat.count("[needs the") == 6


def test_generate_json(tiny_export, capsys):
    assert main(["generate", "--model", str(tiny_export), "--prompt-ids", "5,9,33", "--max-new-tokens", "6",
                 "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"prompt_ids", "generated_ids", "text", "finish_reason", "ttft_ms", "tpot_ms"} <= set(out)
    assert out["prompt_ids"] == [5, 9, 33] and len(out["generated_ids"]) == 6 and out["finish_reason"] == "length"


def test_generate_streams_text(tok_export, capsys):
    assert main(["generate", "--model", str(tok_export), "--prompt", "import os", "--max-new-tokens", "8",
                 "--chat", "--system", "Be brief."]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_generate_errors(tiny_export, capsys):
    assert main(["generate", "--model", str(tiny_export), "--prompt-ids", "1,2", "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_export), "--prompt-ids", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_export), "--prompt-ids", "1,2", "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err


def test_chat_session(tok_export):
    proc = subprocess.run([sys.executable, "-m", "llama3_deploy", "chat", "--model", str(tok_export),
                           "--max-new-tokens", "6", "--system", "You are terse."],
                          input="hello\nand again\n\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2


def test_tokens_and_ids(tok_export, capsys):
    assert main(["tokens", "def", "--model", str(tok_export)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("def" in line.split("\t")[1].lower() for line in lines)
    assert main(["tokens", "--model", str(tok_export), "--ids", "1000,1009"]) == 0
    out = capsys.readouterr().out
    assert "<|begin_of_text|>" in out and "<|eot_id|>" in out


def test_tokens_real_vocabulary(shared_dir, capsys):
    assert main(["tokens", "yes", "--model", str(shared_dir / "tokenizer")]) == 0
    found = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    vectors = json.loads((shared_dir / "test-vectors.json").read_text())["vocab_search"]["must_include"]
    assert {k: found.get(k) for k in vectors} == vectors


def test_inspect(tiny_export, tiny_checkpoint, capsys):
    assert main(["inspect", "--model", str(tiny_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 2 and info["kv_heads"] == 2 and info["eos_ids"] == [1, 2, 3]
    assert main(["inspect", "--model", str(tiny_export)]) == 0
    assert "export: portable graph, float32, logits all, opset" in capsys.readouterr().out


def test_inspect_real_configs(shared_dir, capsys):
    assert main(["inspect", "--model", str(shared_dir / "configs" / "meta-llama-3-70b-instruct"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 80 and info["kv_heads"] == 8 and 70.5e9 < info["parameters"] < 70.6e9


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--prompt-tokens", "16", "--new-tokens", "4",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "| llama3-deploy ort" in out and "| pytorch eager" in out
    assert "assistant> " in out and "validation decode" in out
