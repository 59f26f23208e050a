"""A quantized KV cache (calibration/kv_qdq.py): the graph rewrite, its TensorRT-readiness, the contract and
manifest that carry its dtype, and the runtime binding int8 / float8 cache buffers (on ONNX Runtime's CPU)."""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest

from llama3_deploy import contract
from llama3_deploy.calibration import kv_qdq
from llama3_deploy.calibration.trt_check import check_tensorrt_ready
from llama3_deploy.errors import DeployError
from llama3_deploy.export import onnx_export
from llama3_deploy.export.spec import ExportSpec
from llama3_deploy.export.weights import RandomWeights
from llama3_deploy.runtime.kv import PingPongKV
from llama3_deploy.runtime.session import DecoderSession
from tests.conftest import tiny_config

CONFIG = tiny_config()
QDTYPE = {"int8": "int8", "fp8": "float8e4m3fn"}
QMAX = {"int8": 127.0, "fp8": 448.0}


_TRACED = []


def _traced():
    """The tiny portable fp32 graph with its weights, traced once per module (a copy each call)."""
    if not _TRACED:
        model = onnx_export.trace(ExportSpec.make(CONFIG, dtype="float32", flavor="portable"))
        onnx_export.attach_weights(model, RandomWeights(CONFIG, seed=3, dtype="float32"), CONFIG, "float32")
        _TRACED.append(model)
    return _TRACED[0].clone()


def _export(tmp_path, fmt: str | None, kv_amax: dict | None = None):
    """The tiny portable fp32 graph, its cache quantized when `fmt` is given; returns (model path, spec)."""
    spec = ExportSpec.make(CONFIG, dtype="float32", flavor="portable", kv_dtype=QDTYPE[fmt] if fmt else None)
    model = _traced()
    if fmt:
        kv_qdq.quantize_kv_cache(model, kv_amax=kv_amax, fmt=fmt)
    out = tmp_path / (fmt or "fp32")
    out.mkdir()
    return onnx_export.save(model, out), spec


def _prefill(path, ids: np.ndarray) -> dict:
    """One prefill from an empty cache on ONNX Runtime: every output by name (float8 read back as its codes)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b, s = ids.shape
    feeds = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones((b, s), np.int64),
             contract.POSITION_IDS: np.broadcast_to(np.arange(s), (b, s)).copy()}
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    empty = np.zeros(b * CONFIG.num_key_value_heads * CONFIG.head_dim, np.uint8)  # zero-length past: any pointer
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            etype = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(float8e4m3fn)": 17}[i.type]
            binding.bind_input(i.name, "cpu", 0, etype, [b, CONFIG.num_key_value_heads, 0, CONFIG.head_dim],
                               empty.ctypes.data)
    for o in sess.get_outputs():
        binding.bind_output(o.name, "cpu")
    sess.run_with_iobinding(binding)
    return {o.name: v for o, v in zip(sess.get_outputs(), binding.get_outputs())}


@pytest.fixture(scope="module")
def fp32_present(tmp_path_factory):
    """The fp32 graph's logits and cache on a prompt, and amax of each cached tensor (the calibration)."""
    path, _ = _export(tmp_path_factory.mktemp("kv"), None)
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 12), dtype=np.int64)
    out = {k: v.numpy() for k, v in _prefill(path, ids).items()}
    amax = {f"layers.{i}.{kind}": float(np.abs(out[name(i)]).max())
            for i in range(CONFIG.num_hidden_layers)
            for kind, name in (("key", contract.present_key), ("value", contract.present_value))}
    return ids, out, amax


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_the_cache_holds_the_codes_of_the_fp32_cache(fmt, fp32_present, tmp_path):
    ids, ref, amax = fp32_present
    path, spec = _export(tmp_path, fmt, amax)
    assert check_tensorrt_ready(path) == []
    out = _prefill(path, ids)
    for i in range(CONFIG.num_hidden_layers):
        for kind, name in (("key", contract.present_key), ("value", contract.present_value)):
            scale = np.float32(amax[f"layers.{i}.{kind}"] / QMAX[fmt])
            value = out[name(i)]
            assert value.data_type() == f"tensor({QDTYPE[fmt]})"
            want = ref[name(i)] / scale  # what QuantizeLinear computes: x / scale, rounded (int8) or cast (fp8)
            if fmt == "int8":
                codes, want = value.numpy(), np.clip(np.rint(want), -127, 127).astype(np.int8)
            else:
                raw = (np.ctypeslib.ctypes.c_uint8 * int(np.prod(value.shape()))).from_address(value.data_ptr())
                codes = np.frombuffer(bytes(raw), np.uint8).view(ml_dtypes.float8_e4m3fn).reshape(value.shape())
                want = want.astype(ml_dtypes.float8_e4m3fn)
            if i == 0:  # layer 0's keys/values depend on the prompt alone: exactly the fp32 cache's codes
                np.testing.assert_array_equal(codes, want)
            else:  # later layers read attention over the rounded cache: near the fp32 cache
                err = np.abs(codes.astype(np.float32) - want.astype(np.float32)).max() * scale
                assert err < 0.08 * amax[f"layers.{i}.{kind}"], (i, kind, err)
    # Attention read the rounded cache: logits stay close to fp32 (measured: int8 0.4%, fp8 2% of max |logit|).
    err = np.abs(out[contract.LOGITS].numpy() - ref[contract.LOGITS]).max() / np.abs(ref[contract.LOGITS]).max()
    assert err < {"int8": 0.02, "fp8": 0.06}[fmt]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_the_runtime_binds_a_quantized_cache_and_decodes_like_fp32(fmt, fp32_present, tmp_path):
    _, _, amax = fp32_present
    ref_path, ref_spec = _export(tmp_path, None)
    path, spec = _export(tmp_path, fmt, amax)

    def session(p, s):
        return DecoderSession(p, config=CONFIG, dtype="float32", io=s.io, flavor="portable", logits="all")

    q, f = session(path, spec), session(ref_path, ref_spec)
    assert q.kv_dtype == QDTYPE[fmt] and f.kv_dtype == "float32"
    # A quarter of the fp32 cache's bytes (the logits and token buffers are the same).
    kv_fp32 = PingPongKV.nbytes(f, 2, 64, 16) - PingPongKV.nbytes(q, 2, 64, 16)
    assert kv_fp32 == 3 * 2 * 2 * CONFIG.num_hidden_layers * 2 * CONFIG.num_key_value_heads * 64 * CONFIG.head_dim
    caches = [PingPongKV(s, 2, 64, 16) for s in (q, f)]
    assert all(b.host.itemsize == 1 for pair in caches[0].buffers for b in pair)
    prompts = [[5, 9, 33, 7, 100, 2], [8, 8, 41]]
    tokens = [c.prefill(prompts).argmax(-1) for c in caches]
    agree = total = 0
    for _ in range(8):  # each cache decodes its own greedy tokens
        agree, total = agree + int((tokens[0] == tokens[1]).sum()), total + 2
        tokens = [c.decode(t).argmax(-1) for c, t in zip(caches, tokens)]
    assert agree / total >= 0.75  # measured: all 16


def test_bad_kv_calibrations_and_graphs_are_refused(fp32_present, tmp_path):
    _, _, amax = fp32_present
    with pytest.raises(DeployError, match="missing"):
        _export(tmp_path, "int8", {k: v for k, v in amax.items() if k != "layers.1.value"})
    with pytest.raises(DeployError, match="bad"):
        _export(tmp_path, "int8", {**amax, "layers.0.key": float("nan")})
    with pytest.raises(DeployError, match="KV cache format"):
        kv_qdq.quantize_kv_cache(_traced(), kv_amax=amax, fmt="int4")
    graph = _traced()  # a graph whose present is not Concat(past, new), as in the optimized flavor's in-place cache
    graph.graph.outputs[-1].producer().op_type = "Add"
    with pytest.raises(DeployError, match="not a portable decoder graph"):
        kv_qdq.quantize_kv_cache(graph, kv_amax=amax, fmt="int8")


def test_contract_spec_and_manifest_carry_the_cache_dtype():
    io = contract.decoder_io(CONFIG, "float16", kv_dtype="int8")
    assert {s.dtype for s in io.inputs if s.name.startswith("past")} == {"int8"}
    assert {s.dtype for s in io.outputs if s.name.startswith("present")} == {"int8"}
    assert io.outputs[0].dtype == "float32"  # logits are not the cache
    for kwargs in ({"kv_dtype": "int4"}, {"kv_dtype": "int8", "flavor": "optimized", "logits": "last"}):
        with pytest.raises(ValueError, match="KV cache"):
            contract.decoder_io(CONFIG, "float32", **kwargs)
    with pytest.raises(DeployError, match="portable flavor"):
        ExportSpec.make(CONFIG, dtype="float32", flavor="optimized", kv_dtype="int8")
    spec = ExportSpec.make(CONFIG, dtype="float32", flavor="portable", kv_dtype="float8e4m3fn")
    assert spec.trace_io == dataclasses.replace(spec, kv_dtype=None).io != spec.io
    assert spec.options_json()["kv_dtype"] == "float8e4m3fn"


def _input_dq(*, qtype=None, scale_dims=()):
    """cache (graph input) -> DequantizeLinear -> y: a quantized cache read back (qtype None: a float input)."""
    from onnx import TensorProto, helper, numpy_helper
    qtype = TensorProto.INT8 if qtype is None else qtype
    scale = numpy_helper.from_array(np.full(scale_dims, 0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.zeros(scale_dims, np.int8), "zp")
    node = helper.make_node("DequantizeLinear", ["cache", "s", "zp"], ["y"], axis=1, name="cache.dq")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cache", qtype, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [scale, zp])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_readiness_of_a_dequantized_graph_input():
    from onnx import TensorProto
    assert check_tensorrt_ready(_input_dq()) == []
    assert "per-channel scale (4,) on graph input cache" in " ".join(check_tensorrt_ready(_input_dq(scale_dims=(4,))))
    float_input = " ".join(check_tensorrt_ready(_input_dq(qtype=TensorProto.FLOAT)))
    assert "reads cache, a graph input" in float_input  # a float input is not a quantized cache
