"""The newcomer path as the README writes it: what a new user runs and what they are told."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from llama3_deploy.cli import main
from llama3_deploy.demo import DEFAULT_WORKDIR

ROOT = Path(__file__).resolve().parent.parent


def _copy_without_tokenizer(export: Path, dst: Path) -> Path:
    shutil.copytree(export, dst)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (dst / name).unlink(missing_ok=True)
    return dst


def test_tokens_validates_every_id_before_printing(tok_export, capsys):
    assert main(["tokens", "--model", str(tok_export), "--ids", "9,999999"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "999999" in captured.err and "outside the vocabulary" in captured.err


def test_tokens_accepts_a_tokenizer_file(tok_export, capsys):
    assert main(["tokens", "def", "--model", str(tok_export / "tokenizer.json")]) == 0
    assert capsys.readouterr().out.strip()


def test_inspect_json_into_a_closed_pipe_ends_quietly(tiny_export):
    proc = subprocess.run(f"{sys.executable} -m llama3_deploy inspect --model {tiny_export} --json | head -c 1",
                          shell=True, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_inspect_states_the_tokenizer_or_its_absence(tok_export, tiny_export, capsys):
    assert main(["inspect", "--model", str(tok_export)]) == 0
    assert "tokenizer: tokenizer.json" in capsys.readouterr().out
    assert main(["inspect", "--model", str(tiny_export)]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: none" in out and "--tokenizer" in out


def test_inspect_refuses_a_malformed_manifest(tiny_export, tmp_path, capsys):
    broken = shutil.copytree(tiny_export, tmp_path / "broken")
    (broken / "manifest.json").write_text('{"format": "llama3-deploy/onnx-decoder", "flavor": 3}')
    assert main(["inspect", "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "manifest" in err and "Traceback" not in err


def test_generate_without_a_tokenizer_prints_ids(tiny_export, tmp_path, capsys):
    bare = _copy_without_tokenizer(tiny_export, tmp_path / "bare")
    assert main(["generate", "--model", str(bare), "--prompt-ids", "5,9,33", "--max-new-tokens", "4",
                 "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().split(",")) == 4 and "no tokenizer" in captured.err
    assert main(["generate", "--model", str(bare), "--prompt", "hello"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    try:
        main(["generate", "--help"])
    except SystemExit:
        pass
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in out and "(default: cpu)" in out


def test_chat_default_token_limit_and_reset_ack(tok_export):
    proc = subprocess.run([sys.executable, "-m", "llama3_deploy", "chat", "--model", str(tok_export),
                           "--max-new-tokens", "4", "--system", "Be terse."],
                          input="hello\n/reset\nagain\n\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "conversation cleared" in proc.stderr and proc.stdout.count("assistant> ") == 2
    assert proc.stdout.count("[cut at --max-new-tokens 4]") == 2  # greedy on random weights: no EOS in 4 tokens
    from llama3_deploy.runtime.cli import CHAT_MAX_NEW_TOKENS
    assert 64 <= CHAT_MAX_NEW_TOKENS <= 2048


def test_chat_ctrl_c_stops_the_reply_not_the_conversation(tok_export, monkeypatch, capsys):
    from llama3_deploy.runtime import generate as generate_module

    def interrupted(self, *args, **kwargs):
        yield "partial"
        raise KeyboardInterrupt

    lines = iter(["first", "second", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    real = generate_module.Generator.stream
    calls = []
    monkeypatch.setattr(generate_module.Generator, "stream",
                        lambda self, *a, **k: (calls.append(1), interrupted(self) if len(calls) == 1
                                               else real(self, *a, **k))[1])
    assert main(["chat", "--model", str(tok_export), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "partial [stopped]" in out and out.count("assistant> ") == 2


def test_demo_writes_outside_the_working_directory():
    assert ROOT not in DEFAULT_WORKDIR.resolve().parents and DEFAULT_WORKDIR.resolve() != ROOT


def test_shared_dir_is_absolute(shared_dir):
    """The README's command passes LLAMA3_SHARED_DIR=../shared/llama3; fixtures link to it from temporary
    directories, so it is resolved once (a relative link target there pointed nowhere)."""
    assert shared_dir.is_absolute() and (shared_dir / "tokenizer" / "tokenizer.json").is_file()


def test_export_summary_states_a_missing_tokenizer(tmp_path, capsys):
    from tests.conftest import tiny_config
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps(tiny_config(num_hidden_layers=1).to_hf_dict()))
    assert main(["export", "--model", f"random:{cfg_dir}", "--output", str(tmp_path / "out"), "--quiet",
                 "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: none" in out and "--tokenizer" in out


def test_export_reports_every_phase_and_the_write_bar_ends_at_100(tmp_path, capsys):
    from tests.conftest import tiny_config
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps(tiny_config(num_hidden_layers=1).to_hf_dict()))
    assert main(["export", "--model", f"random:{cfg_dir}", "--output", str(tmp_path / "out"),
                 "--flavor", "optimized"]) == 0
    err = capsys.readouterr().err
    assert "[export] building the optimized graph" in err and "[export] validating" in err
    bar = [part for part in err.replace("\r", "\n").splitlines() if part.startswith("writing weights")][-1]
    assert bar.startswith("writing weights: 100%"), bar
