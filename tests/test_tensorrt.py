"""The TensorRT stage on the CPU: profiles, the engine manifest's refusals, the build's call sequence against a
fake TensorRT (tests/fake_tensorrt.py), and the TensorRT session's token loop end to end on host buffers.

Nothing here touches real TensorRT; TestRealTensorRT does, and is skipped where the library is absent.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llama3_deploy import contract
from llama3_deploy import engine as eng
from llama3_deploy.cli import main
from llama3_deploy.config import preset
from llama3_deploy.errors import DeployError, ValidationError
from llama3_deploy.manifest import load_manifest
from llama3_deploy.export.tensorrt import build_engine
from llama3_deploy.runtime.generate import Generator
from llama3_deploy.runtime.tensorrt import TensorRTSession
from tests.conftest import PARITY_CONFIGS, tiny_config
from tests.fake_tensorrt import CudaError, Fake, LegacyParserError, ParserError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
LIMITS = dict(max_batch=2, max_context=64, prefill_chunk=8)
STREAM = 0x5EED  # the fake stream's handle


def _triples(cfg, limits):
    return {p.name: p for p in eng.profiles(contract.decoder_io(cfg, "float32"), cfg, limits)}


# --- profiles --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gqa2_hd16", "gqa8_hd64", "rope_llama3"])
def test_profiles_cover_every_input_with_consistent_points(name):
    cfg = PARITY_CONFIGS[name]
    io = contract.decoder_io(cfg, "float32")
    K, D = cfg.num_key_value_heads, cfg.head_dim
    profs = eng.profiles(io, cfg, eng.Limits(4, 128, 32))
    assert [p.name for p in profs] == [eng.PREFILL, eng.DECODE]
    for p in profs:
        assert list(p.shapes) == [s.name for s in io.inputs]
        for point in range(3):  # min, opt, max: the mask's T is P + S at every point
            ids, mask = p.shapes[contract.INPUT_IDS][point], p.shapes[contract.ATTENTION_MASK][point]
            past = p.shapes[contract.past_key(0)][point]
            assert mask == (ids[0], past[2] + ids[1]) and past[:2] == (ids[0], K) and past[3] == D
            assert p.shapes[contract.POSITION_IDS][point] == ids
            assert all(p.shapes[n][point] == past for n in io.past_names)
    prefill, decode = profs
    assert prefill.shapes[contract.INPUT_IDS] == ((1, 1), (4, 32), (4, 32))
    assert prefill.shapes[contract.past_key(0)] == ((1, K, 0, D), (4, K, 0, D), (4, K, 127, D))
    assert prefill.shapes[contract.ATTENTION_MASK] == ((1, 1), (4, 32), (4, 127 + 32))
    assert decode.shapes[contract.INPUT_IDS] == ((1, 1), (4, 1), (4, 1))
    assert decode.shapes[contract.ATTENTION_MASK] == ((1, 1), (4, 65), (4, 128))
    assert decode.shapes[contract.past_value(cfg.num_hidden_layers - 1)][2] == (4, K, 127, D)


def test_profiles_of_the_real_8b_shape():
    cfg = preset("meta-llama-3-8b-instruct")
    p = _triples(cfg, eng.Limits(8, 8192, 512))
    assert len(p[eng.DECODE].shapes) == 3 + 2 * 32
    assert p[eng.DECODE].shapes["past_key_values.31.value"] == ((1, 8, 0, 128), (8, 8, 4096, 128), (8, 8, 8191, 128))
    assert p[eng.PREFILL].shapes[contract.ATTENTION_MASK][2] == (8, 8191 + 512)
    assert json.loads(json.dumps(p[eng.PREFILL].to_json())) == p[eng.PREFILL].to_json()
    assert eng.Profile.from_json(p[eng.PREFILL].to_json()) == p[eng.PREFILL]


@pytest.mark.parametrize("limits, message", [
    ((0, 64, 8), "max_batch must be >= 1"), ((True, 64, 8), "max_batch must be an integer"),
    ((1, 64, 0), "prefill_chunk must be from 1 to max_context 64"), ((1, 64, 65), "prefill_chunk must be from 1"),
    ((1, 257, 8), "max_context 257 exceeds the model's context of 256"), ((1, 64.0, 8), "max_context must be an int"),
])
def test_limits_are_checked(limits, message):
    with pytest.raises(DeployError, match=message):
        eng.profiles(contract.decoder_io(tiny_config(), "float32"), tiny_config(), eng.Limits(*limits))


def test_optimized_contract_has_no_profile():
    cfg = tiny_config()
    io = contract.decoder_io(cfg, "float32", flavor="optimized", logits="last")
    with pytest.raises(DeployError, match="portable exports only"):
        eng.profiles(io, cfg, eng.Limits(1, 64, 8))


# --- precision -------------------------------------------------------------------------------------------
def test_precision_reads_the_contract_and_the_qdq_record():
    cfg = tiny_config()
    plain = eng.precision({"dtype": "float16"}, contract.decoder_io(cfg, "float16"))
    assert plain == {"weight_dtype": "float16", "qdq_format": None, "kv_dtype": "float16"}
    fp8_kv = eng.precision({"dtype": "float16", "qdq": {"format": "int8"}},
                           contract.decoder_io(cfg, "float16", kv_dtype="float8e4m3fn"))
    assert fp8_kv == {"weight_dtype": "float16", "qdq_format": "int8", "kv_dtype": "float8e4m3fn"}
    with pytest.raises(DeployError, match="unknown format 'int4'"):
        eng.precision({"dtype": "float32", "qdq": {"format": "int4"}}, contract.decoder_io(cfg, "float32"))


@pytest.mark.parametrize("prec, cc, message", [
    ({"qdq_format": "fp8", "kv_dtype": "float16"}, (8, 6), "FP8 .* >= 8.9; GPU X is 8.6"),
    ({"qdq_format": None, "kv_dtype": "float8e4m3fn"}, (8, 0), "FP8 .* >= 8.9"),
    ({"qdq_format": "int8", "kv_dtype": "float32"}, (7, 0), "INT8 Q/DQ engines need compute capability >= 7.5"),
    ({"qdq_format": "fp8", "kv_dtype": "float8e4m3fn"}, (8, 9), None),
    ({"qdq_format": "int8", "kv_dtype": "int8"}, (7, 5), None),
    ({"qdq_format": None, "kv_dtype": "float16"}, (6, 1), None),
])
def test_compute_capability(prec, cc, message):
    if message is None:
        eng.check_compute_capability(prec, "GPU X", cc)
    else:
        with pytest.raises(DeployError, match=message):
            eng.check_compute_capability(prec, "GPU X", cc)


# --- the engine manifest ---------------------------------------------------------------------------------
GPU = dict(trt_version="10.8.0.43", gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0))


def _engine_dir(tmp_path) -> Path:
    d = tmp_path / "engine"
    d.mkdir()
    (d / eng.ENGINE_FILE).write_bytes(b"engine bytes")
    source = {"format": "llama3-deploy/onnx-decoder", "source": {"model": "x"}}
    (d / "manifest.json").write_text(json.dumps(source))
    cfg = tiny_config()
    limits = eng.Limits(1, 64, 8)
    eng.EngineManifest("10.8.0.43", "NVIDIA H100 80GB HBM3", (9, 0), "ab" * 32, source, limits,
                       tuple(eng.profiles(contract.decoder_io(cfg, "float32"), cfg, limits)),
                       {"weight_dtype": "float32", "qdq_format": None, "kv_dtype": "float32"},
                       hashlib.sha256(b"engine bytes").hexdigest(), 12).write(d)
    return d


def _edit(d: Path, fn) -> None:
    raw = json.loads((d / eng.ENGINE_MANIFEST_FILE).read_text())
    fn(raw)
    (d / eng.ENGINE_MANIFEST_FILE).write_text(json.dumps(raw))


@pytest.mark.parametrize("damage, gpu, message", [
    (lambda d: (d / eng.ENGINE_MANIFEST_FILE).unlink(), {}, "has no engine.json"),
    (lambda d: (d / eng.ENGINE_MANIFEST_FILE).write_text("{not json"), {}, "not valid JSON"),
    (lambda d: _edit(d, lambda r: r.pop("gpu")), {}, "engine manifest .* is malformed"),
    (lambda d: _edit(d, lambda r: r["gpu"].update(compute_capability="9.0")), {}, "is malformed"),
    (lambda d: _edit(d, lambda r: r.update(format="other")), {}, "is malformed"),
    (None, {"trt_version": "10.9.0.34"}, "built by TensorRT 10.8.0.43, this is TensorRT 10.9.0.34"),
    (None, {"gpu_name": "NVIDIA A100-SXM4-80GB"}, "built for NVIDIA H100 80GB HBM3 .* this GPU is NVIDIA A100"),
    (None, {"compute_capability": (8, 0)}, r"compute capability 9.0\), this GPU is .* \(8.0\)"),
    (lambda d: (d / eng.ENGINE_FILE).write_bytes(b"engine bytez"), {}, "does not match its manifest"),
    (lambda d: (d / eng.ENGINE_FILE).unlink(), {}, "missing its engine file"),
    (lambda d: (d / "manifest.json").write_text("{}"), {}, "differs from the export manifest"),
])
def test_verify_engine_refuses(tmp_path, damage, gpu, message):
    d = _engine_dir(tmp_path)
    if damage is not None:
        damage(d)
    with pytest.raises(DeployError, match=message):
        eng.verify_engine(d, **{**GPU, **gpu})
    with pytest.raises(DeployError, match=message):
        eng.read_engine(d, **{**GPU, **gpu})


def test_verify_engine_accepts_a_matching_engine(tmp_path):
    d = _engine_dir(tmp_path)
    m = eng.verify_engine(d, **GPU)
    assert m.gpu_name == GPU["gpu_name"] and m.limits == eng.Limits(1, 64, 8)
    assert eng.read_engine(d, **GPU) == (m, b"engine bytes")
    assert eng.EngineManifest.from_json(m.to_json()) == m


# --- the build, against the fake ------------------------------------------------------------------------
def _copy_export(src: Path, dst: Path, **manifest_changes) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "manifest.json").read_text())
    raw.update(manifest_changes)
    (dst / "manifest.json").write_text(json.dumps(raw))
    return dst


def _nothing_left(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_build_call_sequence_and_outputs(tiny_export, tmp_path, monkeypatch):
    fake = Fake().install(monkeypatch)
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"old timings")
    out = tmp_path / "engine"
    result = build_engine(tiny_export, out, workspace_gib=0.5, timing_cache=cache, progress=False, **LIMITS)
    apis = [c[0] for c in fake.calls]
    order = ["cudaSetDevice", "cudaGetDeviceProperties", "Builder", "create_network", "parse_from_file",
             "set_memory_pool_limit", "add_optimization_profile", "create_timing_cache", "set_timing_cache",
             "build_serialized_network", "get_timing_cache"]
    positions = [apis.index(a) for a in order]
    assert positions == sorted(positions), [apis[i] for i in sorted(positions)]
    assert fake.named("create_network") == [("create_network", 1 << 1)]  # STRONGLY_TYPED is 1 in the fake
    assert fake.named("parse_from_file") == [("parse_from_file", str(tiny_export / contract.MODEL_FILE))]
    assert fake.named("set_memory_pool_limit") == [("set_memory_pool_limit", 0, 1 << 29)]
    m = result.manifest
    want = eng.profiles(load_manifest(tiny_export).io, tiny_config(), eng.Limits(**LIMITS))
    assert fake.named("set_shape") == [("set_shape", n, *s) for p in want for n, s in p.shapes.items()]
    assert [c[1] for c in fake.named("add_optimization_profile")] == [0, 1]
    assert fake.named("create_timing_cache") == [("create_timing_cache", b"old timings")]
    assert fake.named("set_timing_cache") == [("set_timing_cache", False)]
    assert cache.read_bytes() == b"old timings|timed"  # written back for the next build
    assert {p.name for p in out.iterdir()} == {eng.ENGINE_FILE, eng.ENGINE_MANIFEST_FILE, "manifest.json",
                                               "config.json", "generation_config.json"}
    assert _nothing_left(tmp_path, "engine.tmp") and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert m.engine_sha256 == hashlib.sha256((out / eng.ENGINE_FILE).read_bytes()).hexdigest()
    assert m.source_onnx_sha256 == hashlib.sha256((tiny_export / contract.MODEL_FILE).read_bytes()).hexdigest()
    assert m.source_manifest == json.loads((tiny_export / "manifest.json").read_text())
    assert (m.tensorrt_version, m.gpu_name, m.compute_capability) == ("10.8.0.43", "NVIDIA H100 80GB HBM3", (9, 0))
    assert m.precision == {"weight_dtype": "float32", "qdq_format": None, "kv_dtype": "float32"}
    assert eng.verify_engine(out, **GPU) == m
    assert "NVIDIA H100" in result.summary()


def test_tensorrt_11_networks_are_strongly_typed_without_a_flag(tiny_export, tmp_path, monkeypatch):
    fake = Fake(version="11.0.0.1").install(monkeypatch)
    build_engine(tiny_export, tmp_path / "e", progress=False, **LIMITS)
    assert fake.named("create_network") == [("create_network", 0)]


def test_parser_errors_are_named_by_node(tiny_export, tmp_path, monkeypatch):
    Fake(parse_errors=[ParserError("no importer for op Foo", 7, "/layers.0/attn/Foo", "Foo"),
                       LegacyParserError("graph is malformed")]).install(monkeypatch)
    with pytest.raises(DeployError) as e:
        build_engine(tiny_export, tmp_path / "e", progress=False, **LIMITS)
    text = str(e.value)
    assert "could not read" in text and "2 errors" in text
    assert "node '/layers.0/attn/Foo' (Foo): no importer for op Foo [UNSUPPORTED_NODE]" in text
    assert "the graph: graph is malformed [INVALID_NODE]" in text
    assert _nothing_left(tmp_path, "e")


def test_failed_build_and_cache_mismatch_leave_nothing(tiny_export, tmp_path, monkeypatch):
    Fake(build_fails=True).install(monkeypatch)
    with pytest.raises(DeployError, match="could not build an engine .* --workspace-gib"):
        build_engine(tiny_export, tmp_path / "e", progress=False, **LIMITS)
    assert _nothing_left(tmp_path, "e")
    Fake(timing_mismatch=True).install(monkeypatch)
    cache = tmp_path / "c.cache"
    cache.write_bytes(b"other gpu")
    with pytest.raises(DeployError, match="timing cache does not match"):
        build_engine(tiny_export, tmp_path / "e", timing_cache=cache, progress=False, **LIMITS)
    assert _nothing_left(tmp_path, "e") and cache.read_bytes() == b"other gpu"


FP8_KV = {"kv_dtype": "float8e4m3fn",
          "io": contract.decoder_io(tiny_config(), "float32", kv_dtype="float8e4m3fn").to_json()}


@pytest.mark.parametrize("changes, cc, message", [
    ({"qdq": {"format": "fp8"}}, (8, 6), "FP8 .* >= 8.9"),
    ({"qdq": {"format": "int8"}}, (7, 0), ">= 7.5"),
    ({"qdq": {"format": "int8"}, **FP8_KV}, (8, 6), "FP8 .* >= 8.9"),  # the KV dtype, read from the contract
])
def test_quantized_export_refused_on_an_older_gpu_before_building(tiny_export, tmp_path, monkeypatch, changes, cc,
                                                                     message):
    export = _copy_export(tiny_export, tmp_path / "q", **changes)
    fake = Fake(gpu_name="NVIDIA GeForce RTX 3090", cc=cc).install(monkeypatch)
    with pytest.raises(DeployError, match=message):
        build_engine(export, tmp_path / "e", progress=False, **LIMITS)
    assert not fake.named("Builder") and _nothing_left(tmp_path, "e")


def test_qdq_export_is_checked_for_tensorrt_first(tiny_export, tmp_path, monkeypatch):
    from llama3_deploy.calibration import trt_check
    export = _copy_export(tiny_export, tmp_path / "q", qdq={"format": "int8"})
    checked = []
    monkeypatch.setattr(trt_check, "require_tensorrt_ready", lambda p: checked.append(Path(p)))
    fake = Fake(cc=(8, 6)).install(monkeypatch)
    m = build_engine(export, tmp_path / "e", progress=False, **LIMITS).manifest
    assert checked == [export / contract.MODEL_FILE] and m.precision["qdq_format"] == "int8"

    def refuse(path):
        raise ValidationError("the graph is not ready for TensorRT explicit quantization (1 problems)")

    monkeypatch.setattr(trt_check, "require_tensorrt_ready", refuse)
    fake.calls.clear()
    with pytest.raises(ValidationError, match="not ready"):
        build_engine(export, tmp_path / "e2", progress=False, **LIMITS)
    assert not fake.named("Builder") and _nothing_left(tmp_path, "e2")


def test_optimized_export_and_bad_inputs_refused_before_tensorrt(tiny_export, tmp_path, monkeypatch):
    fake = Fake().install(monkeypatch)
    optimized = _copy_export(tiny_export, tmp_path / "opt", flavor="optimized")
    with pytest.raises(DeployError, match="optimized-flavor export.*no TensorRT importer.*--flavor portable"):
        build_engine(optimized, tmp_path / "e", progress=False)
    with pytest.raises(DeployError, match="export directory not found"):
        build_engine(tmp_path / "nope", tmp_path / "e", progress=False)
    with pytest.raises(DeployError, match="max_context 1000 exceeds the model's context of 256"):
        build_engine(tiny_export, tmp_path / "e", max_context=1000, progress=False)
    with pytest.raises(DeployError, match="workspace_gib must be a positive number"):
        build_engine(tiny_export, tmp_path / "e", workspace_gib=float("nan"), progress=False)
    with pytest.raises(DeployError, match="contains the input"):
        build_engine(tiny_export, tiny_export.parent, progress=False, overwrite=True)
    assert fake.calls == [] and _nothing_left(tmp_path, "e")


def test_existing_output_needs_overwrite(tiny_export, tmp_path, monkeypatch):
    Fake().install(monkeypatch)
    out = tmp_path / "e"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DeployError, match="not empty.*--overwrite"):
        build_engine(tiny_export, out, progress=False, **LIMITS)
    assert (out / "keep.txt").read_text() == "mine"
    build_engine(tiny_export, out, overwrite=True, progress=False, **LIMITS)
    assert not (out / "keep.txt").exists() and (out / eng.ENGINE_FILE).is_file()


def test_defaults_follow_the_model(tiny_export, tmp_path, monkeypatch):
    Fake().install(monkeypatch)
    m = build_engine(tiny_export, tmp_path / "e", progress=False).manifest
    assert m.limits == eng.Limits(1, 256, 256)  # min(4096, context 256), min(512, max_context)


# --- the run: TensorRTSession in the token loop ----------------------------------------------------------
@pytest.fixture(scope="module")
def built(tiny_export, tmp_path_factory):
    """(engine directory, the Fake that built it); sessions need a Fake installed again (see `fake`)."""
    with pytest.MonkeyPatch.context() as mp:
        Fake().install(mp)
        out = tmp_path_factory.mktemp("trt") / "engine"
        build_engine(tiny_export, out, progress=False, **LIMITS)
    return out


@pytest.fixture
def fake(monkeypatch):
    return Fake().install(monkeypatch)


PROMPTS = [[5, 9, 33, 100, 7, 250, 17, 41, 8, 99, 3], [44, 21, 9]]  # 11 tokens (two prefill chunks), 3 tokens


@pytest.fixture(scope="module")
def reference(tiny_export):
    gen = Generator(tiny_export)
    return ([gen.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True).generated_ids],
            [r.generated_ids for r in gen.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)])


def _kv_addresses(fake, name):
    return [c[3] for c in fake.named("set_tensor_address") if c[2] == name]


def test_greedy_tokens_equal_onnxruntime_and_calls_per_step(built, fake, reference):
    session = TensorRTSession(built, device="cpu")
    gen = Generator.from_session(session)
    assert gen.prefill_chunk == LIMITS["prefill_chunk"]  # the default adapts to the engine's chunk
    assert fake.named("set_optimization_profile_async") == [("set_optimization_profile_async", 0, 0, STREAM),
                                                            ("set_optimization_profile_async", 1, 1, STREAM)]
    assert len(fake.named("cudaStreamCreate")) == 1 and fake.named("deserialize_cuda_engine")
    single = gen.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True).generated_ids
    assert [single] == reference[0]
    fake.calls.clear()
    batch = gen.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    assert [r.generated_ids for r in batch] == reference[1]

    runs = fake.named("execute_async_v3")
    assert len(runs) == 2 + 11 and {c[2] for c in runs} == {STREAM}  # 2 prefill chunks, 11 decode steps
    assert [c[1] for c in runs] == [0, 0] + [1] * 11                 # the decode context for S == 1
    shapes = [c[3] for c in fake.named("set_input_shape") if c[2] == contract.INPUT_IDS]
    assert shapes == [(2, 8), (2, 3)] + [(2, 1)] * 11
    masks = [c[3] for c in fake.named("set_input_shape") if c[2] == contract.ATTENTION_MASK]
    assert masks == [(2, 8), (2, 11)] + [(2, 12 + i) for i in range(11)]
    for name in [*session.io.past_names, *session.io.present_names]:  # every tensor bound every step
        assert len(_kv_addresses(fake, name)) == len(runs)
    cache = gen._cache
    a, b = cache.buffers[0]
    past, present = _kv_addresses(fake, contract.past_key(0)), _kv_addresses(fake, contract.present_key(0))
    assert set(past) | set(present) == {a.ptr, b.ptr}  # allocated once: the same two buffers, swapped
    assert all(p == q for p, q in zip(past[1:], present[:-1])) and all(p != q for p, q in zip(past, present))
    assert _kv_addresses(fake, contract.INPUT_IDS) == [cache.ids.ptr] * len(runs)
    assert _kv_addresses(fake, contract.LOGITS) == [cache.logits.ptr] * len(runs)
    assert _kv_addresses(fake, contract.POSITION_IDS) == [cache.pos.ptr] * len(runs)
    assert not fake.named("cudaStreamCreate")  # the session's one stream, created with it
    gen.generate(PROMPTS, max_new_tokens=4, ignore_eos=True)
    assert gen._cache is cache


def test_engine_limits_in_the_generator(built, fake):
    gen = Generator.from_session(TensorRTSession(built, device="cpu"), prefill_chunk=4)
    with pytest.raises(DeployError, match="exceeds the engine's context of 64 tokens"):
        gen.generate(list(range(10, 60)), max_new_tokens=20)
    with pytest.raises(DeployError, match="3 prompts exceed the engine's batch of 2"):
        gen.generate([[5], [6], [7]], max_new_tokens=2)
    with pytest.raises(DeployError, match="prefill_chunk 16 exceeds the engine's 8"):
        Generator.from_session(gen.session, prefill_chunk=16)
    assert gen.generate([5, 6, 7, 8, 9], max_new_tokens=3, ignore_eos=True).generated_ids  # chunks of 4 fit


def test_session_refuses_shapes_outside_the_profile(built, fake):
    session = TensorRTSession(built, device="cpu")
    binding = session.new_binding()
    binding.bind_input(contract.INPUT_IDS, "cpu", 0, np.int64, [3, 1], 1234)
    with pytest.raises(DeployError, match=r"input_ids shape \[3, 1\] is outside the engine's decode profile"):
        session.run(binding)


def test_session_verifies_before_deserializing(built, tmp_path, monkeypatch):
    Fake(gpu_name="NVIDIA L4", cc=(8, 9)).install(monkeypatch)
    with pytest.raises(DeployError, match="this GPU is NVIDIA L4"):
        TensorRTSession(built, device="cpu")
    copy = tmp_path / "engine"
    shutil.copytree(built, copy)
    with open(copy / eng.ENGINE_FILE, "ab") as f:
        f.write(b" ")
    fake = Fake().install(monkeypatch)
    with pytest.raises(DeployError, match="does not match its manifest"):
        TensorRTSession(copy, device="cpu")
    assert not fake.named("deserialize_cuda_engine")
    Fake(cuda_errors={"cudaStreamCreate": CudaError.cudaErrorNoDevice}).install(monkeypatch)
    with pytest.raises(DeployError, match="CUDA cudaStreamCreate failed: cudaErrorNoDevice"):
        TensorRTSession(built, device="cpu")


def test_generator_backend_checks(tiny_export, built):
    with pytest.raises(DeployError, match="is a TensorRT engine directory; run it with backend 'tensorrt'"):
        Generator(built)
    with pytest.raises(DeployError, match="unknown backend 'trt'; choose one of onnxruntime, tensorrt"):
        Generator(tiny_export, backend="trt")
    with pytest.raises(DeployError, match="runs TensorRT engines on a CUDA GPU"):
        Generator(tiny_export, backend="tensorrt", device="cpu")
    if not HAVE_TRT:
        with pytest.raises(DeployError, match=r"pip install 'llama3-deploy\[tensorrt\]'"):
            Generator(tiny_export, backend="tensorrt", device="cuda")


# --- the CLI ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_build_engine_without_the_library_names_the_extra(tiny_export, tmp_path, capsys):
    assert main(["build-engine", "--model", str(tiny_export), "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'llama3-deploy[tensorrt]'" in err and "torch" not in err


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0"], "max_batch must be >= 1"),
    (["--prefill-chunk", "100", "--max-context", "50"], "prefill_chunk must be from 1 to max_context 50"),
    (["--workspace-gib", "0"], "workspace_gib must be a positive number"),
    (["--device", "cpu"], "--device must be cuda or cuda:N"),
])
def test_build_engine_cli_errors(tiny_export, tmp_path, capsys, fake, args, message):
    argv = ["build-engine", "--model", str(tiny_export), "--output", str(tmp_path / "e"), "--quiet", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not fake.named("Builder")


def test_build_engine_cli_builds(tiny_export, tmp_path, capsys, fake):
    argv = ["build-engine", "--model", str(tiny_export), "--output", str(tmp_path / "e"), "--quiet",
            "--max-batch", "2", "--max-context", "64", "--prefill-chunk", "8", "--device", "cuda:1"]
    assert main(argv) == 0
    assert "built " in capsys.readouterr().out and ("cudaSetDevice", 1) in fake.calls
    assert eng.verify_engine(tmp_path / "e", **GPU).limits == eng.Limits(2, 64, 8)


def test_generate_backend_tensorrt_on_cpu_is_refused(tiny_export, capsys):
    argv = ["generate", "--model", str(tiny_export), "--prompt-ids", "1,2", "--backend", "tensorrt"]
    assert main(argv) == 2
    assert "runs TensorRT engines on a CUDA GPU" in capsys.readouterr().err


# --- real TensorRT (never run here: the library is not installable on these machines) ---------------------
def _cuda_gpu() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt library and a CUDA GPU")
class TestRealTensorRT:
    def test_engine_greedy_tokens_equal_onnxruntime(self, tiny_export, tmp_path):
        if not _cuda_gpu():
            pytest.skip("needs the tensorrt library and a CUDA GPU (onnxruntime-gpu's CUDA provider)")
        out = build_engine(tiny_export, tmp_path / "engine", progress=False, timing_cache=tmp_path / "t.cache",
                           **LIMITS).output
        trt_gen = Generator(out, backend="tensorrt", device="cuda")
        ort_gen = Generator(tiny_export, device="cuda")
        for prompts in (PROMPTS[0], PROMPTS):
            got = trt_gen.generate(prompts, max_new_tokens=12, ignore_eos=True)
            want = ort_gen.generate(prompts, max_new_tokens=12, ignore_eos=True)
            got, want = (got, want) if isinstance(got, list) else ([got], [want])
            assert [r.generated_ids for r in got] == [r.generated_ids for r in want]
        assert (tmp_path / "t.cache").stat().st_size > 0
        assert dataclasses.asdict(eng.verify_engine(out, **_here()))["engine_sha256"]


def _here() -> dict:
    import tensorrt as trt

    from llama3_deploy.runtime.tensorrt import gpu_properties, load_libraries
    _, cudart = load_libraries()
    name, cc = gpu_properties(cudart, 0)
    return dict(trt_version=trt.__version__, gpu_name=name, compute_capability=cc)
