"""The benchmark harness's own logic on a tiny model: it runs, the JSON has every field, the floor
follows from the config. Not the speed itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama3_deploy.benchmarks import floor as F
from llama3_deploy.benchmarks import harness as H
from llama3_deploy.config import preset

from .conftest import tiny_config

GENAI_PYTHON = Path(__file__).resolve().parent.parent / "benchmarks" / ".venv-genai" / "bin" / "python"
LLAMACPP_PYTHON = Path(__file__).resolve().parent.parent / "benchmarks" / ".venv-llamacpp" / "bin" / "python"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One artifact cache for the module: the tiny checkpoint is exported once."""
    return tmp_path_factory.mktemp("bench-work")


# --- the floor, from the config ----------------------------------------------------------------------
def test_floor_counts_from_config():
    c = preset("llama3-cpu-bench")
    h, i, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    per_layer = h * 1024 + 2 * h * 256 + 1024 * h + 3 * h * i  # q, k, v, o, gate/up/down at 16x64 / 4x64 heads
    assert F.linear_params(c) == L * per_layer
    assert abs(c.num_parameters() - 371.7e6) < 0.1e6
    # decode reads every weight once except the embedding table, of which only the batch's rows
    assert F.weight_bytes_read(c, "float32", 1) == (c.num_parameters() - V * h + h) * 4
    assert F.weight_bytes_read(c, "float16", 4) == (c.num_parameters() - V * h + 4 * h) * 2
    kv_tok = 2 * L * 4 * 64 * 4
    b = F.decode_bytes(c, "float32", batch=2, context=100)
    assert b["kv_read"] == 2 * 100 * kv_tok and b["kv_write"] == 2 * kv_tok
    assert b["total"] == b["weights"] + b["kv_read"] + b["kv_write"]
    # prefill: 2 FLOPs per multiply-add per token, causal attention, the head for the last position only
    S = 128
    attn = 4 * L * 16 * 64 * S * (S + 1) // 2
    assert F.prefill_flops(c, 1, S) == 2 * S * F.linear_params(c) + attn + 2 * V * h
    assert F.prefill_flops(c, 3, S) == 3 * F.prefill_flops(c, 1, S)


def test_floor_for_takes_the_binding_limit():
    c = tiny_config()
    slow_memory = F.floor_for(c, "float32", 1, 16, 8, bandwidth=1e3, matmul_rate=1e15)
    assert slow_memory["tpot_bound"] == "memory" and slow_memory["ttft_bound"] == "memory"
    assert slow_memory["tpot_floor_ms"] == pytest.approx(slow_memory["decode_bytes_per_step"] / 1e3 * 1e3)
    slow_compute = F.floor_for(c, "float32", 1, 16, 8, bandwidth=1e15, matmul_rate=1e3)
    assert slow_compute["ttft_bound"] == "compute"
    assert slow_compute["ttft_floor_ms"] == pytest.approx(F.prefill_flops(c, 1, 16) / 1e3 * 1e3)
    # the mean decode context: steps run at contexts 16 .. 16 + 8 - 2
    assert slow_memory["decode_mean_context"] == pytest.approx(16 + 3)


def test_machine_measurements_are_positive():
    m = F.measure_machine("cpu", quick=True)
    assert m["bandwidth"]["bytes_per_s"] > 1e8 and m["matmul"]["flops_per_s"] > 1e8
    assert m["matmul"]["dtype"] == "float32" and m["bandwidth"]["threads"] >= 1


# --- harness pieces ----------------------------------------------------------------------------------
def test_prompts_are_seeded_equal_length_and_avoid_specials():
    a = H.make_prompts(3, 50, 8, seed=1, avoid={0, 1, 2})
    assert a == H.make_prompts(3, 50, 8, seed=1, avoid={0, 1, 2})
    assert [len(r) for r in a] == [50, 50, 50]
    assert not {0, 1, 2} & {t for r in a for t in r}
    assert H.make_prompts(3, 50, 8, seed=2, avoid={0}) != H.make_prompts(3, 50, 8, seed=1, avoid={0})


def test_parse_cells():
    assert H.parse_cells("128x1, 512x4,64") == [H.Cell(128, 1), H.Cell(512, 4), H.Cell(64, 1)]


def test_summary_is_the_median_over_rounds():
    runs = [{"ttft_ms": t, "step_ms": [s] * 9 + [10 * s]} for t, s in ((10, 1.0), (30, 3.0), (20, 2.0))]
    s = H.summarize(runs, batch=2, new_tokens=11)
    assert s["ttft_ms"] == 20
    assert s["tpot_ms"]["p50"] == 2.0 and s["tpot_ms"]["p99"] > s["tpot_ms"]["p90"] >= 2.0
    # tokens/s of the median round: 2 rows x 11 tokens over 20 ms + 9 x 2 ms + 20 ms
    assert s["tokens_per_s"] == pytest.approx(22 / 0.058)
    assert len(s["rounds"]) == 3


def test_rounds_faster_than_pytorch_are_paired_by_round():
    def result(kind, ttfts, tpots):
        return {"kind": kind, "prompt_len": 8, "batch": 1, "ttft_ms": sorted(ttfts)[1], "tpot_ms": {"p50": 1.0},
                "peak_rss_bytes": 1, "tokens_first_row": [1],
                "rounds": [{"ttft_ms": a, "tpot_p50_ms": b} for a, b in zip(ttfts, tpots)]}
    ref, ours = result("torch-eager", [10, 20, 30], [5, 5, 5]), result("ort", [9, 25, 29], [4, 6, None])
    H.add_pytorch_ratios([ref, ours])
    assert ours["rounds_faster_than_pytorch"] == {"ttft": 2, "tpot_p50": 1, "rounds": 3}
    assert ref["rounds_faster_than_pytorch"]["rounds"] == 0  # not compared with itself
    from llama3_deploy.benchmarks.report import _wins
    assert _wins(ours["rounds_faster_than_pytorch"], "ttft") == " (2/3)" and _wins(ref["rounds_faster_than_pytorch"], "ttft") == ""


# --- end to end on a tiny checkpoint -----------------------------------------------------------------
RESULT_FIELDS = ("engine", "version", "ttft_ms", "tpot_ms", "tokens_per_s", "peak_rss_bytes", "peak_rss_generate_bytes",
                 "floor", "ratio_to_floor", "ratio_to_pytorch", "raw", "prompt_len", "batch", "dtype")


def _check_doc(doc: dict, kinds: set[str], cells: set[tuple[int, int]], reps: int) -> None:
    for key in ("machine", "versions", "git", "command", "protocol", "floor", "model", "weights", "engines"):
        assert doc[key], key
    assert "random" in doc["weights"] and doc["machine"]["cpus"] >= 1 and doc["git"]["commit"]
    assert {r["kind"] for r in doc["results"]} == kinds
    assert all(e["artifact"] for e in doc["engines"])  # every engine names what it ran (genai included)
    assert {(r["prompt_len"], r["batch"]) for r in doc["results"]} == cells
    for r in doc["results"]:
        for f in RESULT_FIELDS:
            assert f in r, f
        assert set(r["tpot_ms"]) >= {"p50", "p90", "p99"}
        assert r["ttft_ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_bytes"] >= r["peak_rss_generate_bytes"] > 0
        assert len(r["raw"]["runs"]) == reps and len(r["raw"]["runs"][0]["step_ms"]) == doc["protocol"]["new_tokens"] - 1
        assert r["floor"]["tpot_floor_ms"] > 0 and r["floor"]["ttft_floor_ms"] > 0
        assert r["tokens_equal_pytorch"] == 1.0  # same fp32 weights, greedy: the same tokens
    ref = [r for r in doc["results"] if r["kind"] == "torch-eager"]
    assert all(r["ratio_to_pytorch"]["ttft"] == 1.0 for r in ref)
    assert all(r["rounds_faster_than_pytorch"]["rounds"] == (0 if r in ref else reps) for r in doc["results"])


def test_bench_end_to_end(tiny_checkpoint, work, tmp_path):
    from llama3_deploy.benchmarks.cli import bench
    doc = bench(model=str(tiny_checkpoint), engines="ort,torch-eager,optimum", cells="8x1,8x2", new_tokens=4,
                reps=2, warmup=1, work_dir=str(work), output_dir=str(tmp_path / "out"), name="t",
                quick_floor=True, log=lambda *_: None)
    _check_doc(doc, {"ort", "torch-eager", "optimum"}, {(8, 1), (8, 2)}, reps=2)
    on_disk = json.loads((tmp_path / "out" / "t.json").read_text())
    assert on_disk["results"][0]["floor"]["bandwidth_bytes_per_s"] == on_disk["floor"]["bandwidth_bytes_per_s"]
    md = (tmp_path / "out" / "t.md").read_text()
    assert "seeded random" in md and "| Engine |" in md and md.count("\n| ") >= 1 + 6
    assert {p for p in on_disk["plots"]} == {"t-tpot-vs-context.png", "t-ttft-vs-prompt.png", "t-throughput-vs-batch.png"}
    assert all((tmp_path / "out" / p).stat().st_size > 1000 for p in on_disk["plots"])


def test_engine_that_cannot_start_is_recorded(tiny_checkpoint, tmp_path):
    cfg = tiny_config()
    specs = [H.EngineSpec("torch-eager", str(tiny_checkpoint)), H.EngineSpec("ort", str(tmp_path / "missing"))]
    results, errors = H.run_matrix(specs, [H.Cell(4, 1), H.Cell(4, 2)], config=cfg, new_tokens=3, reps=1, warmup=0,
                                   seed=0, log_dir=tmp_path / "logs", scope="run", log=lambda *_: None)
    assert [r["kind"] for r in results] == ["torch-eager", "torch-eager"]
    assert [e["kind"] for e in errors] == ["ort", "ort"]  # recorded for every cell it missed
    assert "load failed" in errors[0]["error"] and "missing" in errors[0]["error"]


@pytest.mark.skipif(not GENAI_PYTHON.is_file(), reason="no onnxruntime-genai venv (bash benchmarks/peers/setup_genai.sh)")
def test_genai_peer_from_its_venv(tiny_checkpoint, work, tmp_path):
    from llama3_deploy.benchmarks.cli import bench
    doc = bench(model=str(tiny_checkpoint), engines="torch-eager,genai", cells="8x2", new_tokens=4, reps=1,
                warmup=0, work_dir=str(work), output_dir=str(tmp_path / "out"), name="g",
                genai_python=str(GENAI_PYTHON), quick_floor=True, log=lambda *_: None)
    _check_doc(doc, {"torch-eager", "genai"}, {(8, 2)}, reps=1)
    assert doc["versions"]["genai_venv"]["onnxruntime-genai"]


def test_cli_registers_bench(tiny_checkpoint, work):
    from llama3_deploy.cli import build_parser, main
    args = build_parser().parse_args(["bench", "--cells", "8x1", "--engines", "ort"])
    assert args.cells == "8x1" and callable(args.run)
    # The whole command line reaches bench() (the CLI's own entries, e.g. _command, are not passed on).
    assert main(["bench", "--model", str(tiny_checkpoint), "--engines", "torch-eager", "--prepare-only",
                 "--work-dir", str(work)]) == 0


def test_quantized_floor_reads_fewer_bytes():
    cfg = tiny_config(hidden_size=256, intermediate_size=512, vocab_size=2048)
    b = {d: F.decode_bytes(cfg, d, 1, 128)["weights"] for d in ("float32", "int8", "int4")}
    assert b["int4"] < b["int8"] < b["float32"] / 3
    assert F.decode_bytes(cfg, "int4", 1, 128)["kv_read"] == F.decode_bytes(cfg, "float32", 1, 128)["kv_read"]


def test_gguf_floor_and_a_missing_llamacpp_venv(tmp_path):
    cfg = tiny_config(hidden_size=256, intermediate_size=512, vocab_size=2048)
    b = {d: F.decode_bytes(cfg, d, 1, 128)["weights"] for d in ("q4_0", "q8_0", "int8", "f16")}
    assert b["q4_0"] < b["q8_0"] < b["int8"] < b["f16"]  # q8_0's fp16 scales cost less than int8's fp32 ones
    from llama3_deploy.benchmarks.peers import artifacts as A
    with pytest.raises(A.BuildError, match="setup_llamacpp.sh"):
        A.llamacpp(str(tmp_path), tmp_path, precision="q8_0", python=str(tmp_path / "nope" / "python"))
    with pytest.raises(A.BuildError, match="unknown GGUF precision"):
        A.llamacpp(str(tmp_path), tmp_path, precision="q5_k", python=str(tmp_path / "nope" / "python"))


@pytest.mark.skipif(not LLAMACPP_PYTHON.is_file(), reason="no llama.cpp venv (bash benchmarks/peers/setup_llamacpp.sh)")
def test_llamacpp_peer_from_its_venv(shared_dir, tmp_path):
    """A Llama 3-vocabulary tiny model (llama.cpp's converter recognises the real tokenizer), converted to an f32
    GGUF with llama.cpp's own converter, batch 1 and 2 through its C API beside ours."""
    from llama3_deploy.benchmarks.cli import bench

    from .conftest import write_random_checkpoint
    cfg = tiny_config(vocab_size=128256, bos_token_id=128000, eos_token_ids=(128001, 128009))
    ckpt = write_random_checkpoint(tmp_path / "ckpt", cfg, seed=2)
    doc = bench(model=str(ckpt), engines="ort,llamacpp", llamacpp_precisions="f32", cells="8x1,8x2", new_tokens=4,
                reps=1, warmup=0, work_dir=str(tmp_path / "work"), output_dir=str(tmp_path / "out"), name="l",
                llamacpp_python=str(LLAMACPP_PYTHON), tokenizer=str(shared_dir / "tokenizer"), quick_floor=True,
                log=lambda *_: None)
    assert not doc["errors"] and not doc["skipped"], (doc["errors"], doc["skipped"])
    assert all(e["artifact"] for e in doc["engines"]) and doc["engines"][1]["env_versions"]["llama_cpp_python"]
    lc = [r for r in doc["results"] if r["kind"] == "llamacpp"]
    assert {(r["prompt_len"], r["batch"]) for r in lc} == {(8, 1), (8, 2)} and all(r["dtype"] == "f32" for r in lc)
    assert all(r["ttft_ms"] > 0 and r["floor"] for r in lc)
