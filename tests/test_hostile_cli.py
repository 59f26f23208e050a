"""Scripted hostile command lines: each one clear error (exit 2, one line naming the problem), never a
traceback, nothing written; and a property-based fuzz of Generator.generate's inputs."""
from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama3_deploy.cli import main
from llama3_deploy.errors import DeployError


def _refused(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err
    return err


EXPORT_CASES = {
    "missing model": (["--model", "/nonexistent/ckpt"], ["not found"]),
    "unknown preset": (["--model", "random:no-such-preset"], ["unknown preset"]),
    "validate-max-gib nan": (["--model", "random:llama3-cpu-bench", "--validate-max-gib", "nan"],
                             ["--validate-max-gib"]),
    "validate-max-gib negative": (["--model", "random:llama3-cpu-bench", "--validate-max-gib", "-1"],
                                  ["--validate-max-gib"]),
    "block size": (["--model", "random:llama3-cpu-bench", "--flavor", "optimized", "--quantize", "int4",
                    "--block-size", "48"], ["block size"]),
    "portable quantized": (["--model", "random:llama3-cpu-bench", "--quantize", "int8"], ["portable"]),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_refuses(case, tmp_path, capsys):
    args, needles = EXPORT_CASES[case]
    _refused(capsys, ["export", *args, "--output", str(tmp_path / "out"), "--quiet"], *needles)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_export_onto_its_own_checkpoint_is_refused(tiny_checkpoint, tmp_path, capsys):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    before = sorted(p.name for p in ckpt.iterdir())
    for out in (ckpt, tmp_path):
        _refused(capsys, ["export", "--model", str(ckpt), "--output", str(out), "--overwrite", "--quiet"])
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_export_output_parent_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _refused(capsys, ["export", "--model", "random:llama3-cpu-bench", "--output", str(tmp_path / "file" / "out")])


GENERATE_CASES = {
    "threads negative": (["--threads", "-1"], ["threads"]),
    "threads huge": (["--threads", "100000"], ["threads"]),
    "seed negative": (["--seed", "-1"], ["seed"]),
    "temperature nan": (["--temperature", "nan"], ["temperature"]),
    "top-p above one": (["--top-p", "2"], ["top_p"]),
    "zero new tokens": (["--max-new-tokens", "0"], ["max_new_tokens"]),
    "id outside vocabulary": (["--prompt-ids", "1,999999"], ["vocabulary"]),
    "no CUDA provider": (["--device", "cuda"], ["CUDA"]),
    "over the context": (["--max-new-tokens", "100000"], ["context"]),
    "prefill chunk zero": (["--prefill-chunk", "0"], ["prefill_chunk"]),
    "empty ids": (["--prompt-ids", ","], ["--prompt-ids"]),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_refuses(case, tiny_export, capsys):
    args, needles = GENERATE_CASES[case]
    base = ["generate", "--model", str(tiny_export)]
    if "--prompt-ids" not in args:
        base += ["--prompt-ids", "5,9"]
    _refused(capsys, base + args, *needles)


def test_generate_refuses_undecodable_prompt_bytes(tok_export, capsys):
    # Undecodable command-line bytes reach Python as lone surrogates (os.fsdecode's surrogateescape).
    _refused(capsys, ["generate", "--model", str(tok_export), "--prompt", "abc\udce9"], "Unicode")


def test_model_path_problems(tmp_path, capsys):
    _refused(capsys, ["generate", "--model", str(tmp_path / "none"), "--prompt-ids", "1"], "not found")
    _refused(capsys, ["inspect", "--model", str(tmp_path)], "config.json")
    _refused(capsys, ["tokens", "x", "--model", str(tmp_path)], "tokenizer")
    _refused(capsys, ["tokens", "--ids", "1.5", "--model", str(tmp_path)])


# Values a careless or hostile caller can pass to the public API: every one is a result or a DeployError.
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=_values, kwargs=st.dictionaries(
    st.sampled_from(["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop",
                     "ignore_eos", "max_new_token"]), _values, max_size=3))
def test_generate_api_fuzz(tok_generator, prompt, kwargs):
    try:
        tok_generator.generate(prompt, **{"max_new_tokens": 2, **kwargs})
    except DeployError:
        pass


@pytest.fixture(scope="module")
def tok_generator(tok_export):
    from llama3_deploy.runtime import Generator
    return Generator(tok_export)
