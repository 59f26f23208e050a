"""Weight-only quantization: ORT's MatMulNBits / GatherBlockQuantized agree with our dequantized reference."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llama3_deploy.export import quantize as Q
from llama3_deploy.errors import DeployError
from tests.conftest import tiny_config

K = 256
RNG_SEED = 0
# At accuracy_level 4 ORT quantizes the activations to int8 per block, so the product differs from
# x @ W_deq by roughly 1/127 of the block's activation range; 2e-2 of the output's max is the bound.
LEVEL4_RTOL = 2e-2
# fp16 activations/scales/outputs: fp16 rounding of inputs, partial sums and output.
FP16_RTOL = 5e-3


def _weight(k: int, n: int, seed: int = RNG_SEED) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((k, n)) * 0.02).astype(np.float32)


def _session(node: onnx.NodeProto, inputs, output, inits) -> ort.InferenceSession:
    graph = helper.make_graph([node], "g", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run_matmul_nbits(q: Q.QuantizedMatrix, k: int, n: int, spec: Q.QuantSpec, x: np.ndarray) -> np.ndarray:
    tdt = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "S")]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "Z"))
    node = helper.make_node("MatMulNBits", ["x"] + [t.name for t in inits], ["y"], domain="com.microsoft",
                            **Q.matmul_nbits_attributes(k, n, spec))
    sess = _session(node, [helper.make_tensor_value_info("x", tdt, [None, k])],
                    helper.make_tensor_value_info("y", tdt, [None, n]), inits)
    return sess.run(None, {"x": x})[0]


def _rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y.astype(np.float32) - ref).max() / np.abs(ref).max())


SPECS = [("rtn", True), ("rtn", False), ("hqq", False)]


@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("method,symmetric", SPECS)
@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_matches_dequantized(bits, method, symmetric, block_size, accuracy_level):
    n = 96
    spec = Q.QuantSpec(bits=bits, block_size=block_size, symmetric=symmetric, method=method,
                       accuracy_level=accuracy_level)
    q = Q.quantize_matrix(_weight(K, n), spec)
    assert q.packed.dtype == np.uint8 and q.packed.shape == (n, K // block_size, block_size * bits // 8)
    assert q.scales.dtype == np.float32 and q.scales.shape == (n, K // block_size)
    assert (q.zero_points is None) == symmetric
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    ref = x @ Q.dequantize_matrix(q, K, n, spec)
    err = _rel_err(_run_matmul_nbits(q, K, n, spec, x), ref)
    assert err < (1e-4 if accuracy_level == 0 else LEVEL4_RTOL), err


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_matmul_nbits_fp16_activations(method):
    n = 160
    spec = Q.QuantSpec(bits=4, block_size=32, method=method, accuracy_level=0)
    q = Q.quantize_matrix(_weight(K, n).astype(np.float16), spec, scale_dtype=np.float16)
    assert q.scales.dtype == np.float16
    if method == "hqq":  # float zero points travel in the activation dtype
        assert q.zero_points.dtype == np.float16
    x = np.random.default_rng(2).standard_normal((4, K)).astype(np.float16)
    y = _run_matmul_nbits(q, K, n, spec, x)
    assert y.dtype == np.float16
    assert _rel_err(y, x.astype(np.float32) @ Q.dequantize_matrix(q, K, n, spec)) < FP16_RTOL


def _recon_error(spec: Q.QuantSpec, w: np.ndarray) -> float:
    q = Q.quantize_matrix(w, spec)
    return float(np.abs(Q.dequantize_matrix(q, *w.shape, spec) - w).mean())


@pytest.mark.parametrize("block_size", [32, 128])
def test_reconstruction_error_ordering(block_size):
    w = _weight(K, 320, seed=3)
    err = {(bits, method): _recon_error(Q.QuantSpec(bits=bits, block_size=block_size, method=method), w)
           for bits in (4, 8) for method in ("rtn", "hqq")}
    for method in ("rtn", "hqq"):
        assert err[8, method] < err[4, method] / 8, err
    # HQQ's proximal refinement of the zero point must beat plain min/max RTN at 4 bits.
    assert err[4, "hqq"] <= err[4, "rtn"], err


@pytest.mark.parametrize("method,bits", [("rtn", 4), ("rtn", 8), ("hqq", 4), ("hqq", 8)])
def test_chunked_equals_unchunked(monkeypatch, method, bits):
    w = _weight(K, 300, seed=4)
    spec = Q.QuantSpec(bits=bits, method=method)
    whole = Q.quantize_matrix(w, spec)
    monkeypatch.setattr(Q, "CHUNK_COLUMNS", 64)  # 300 = 4 full slices + a partial one
    chunked = Q.quantize_matrix(w, spec)
    np.testing.assert_array_equal(chunked.packed, whole.packed)
    np.testing.assert_array_equal(chunked.scales, whole.scales)
    np.testing.assert_array_equal(chunked.zero_points, whole.zero_points)


def _run_gather(q: Q.QuantizedMatrix, spec: Q.QuantSpec, ids: np.ndarray) -> np.ndarray:
    inits = [numpy_helper.from_array(q.packed, "D"), numpy_helper.from_array(q.scales, "S")]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "Z"))
    names = ["D", "ids", "S"] + (["Z"] if q.zero_points is not None else [])
    node = helper.make_node("GatherBlockQuantized", names, ["y"], domain="com.microsoft",
                            **Q.gather_block_quantized_attributes(spec))
    tdt = TensorProto.FLOAT if q.scales.dtype == np.float32 else TensorProto.FLOAT16
    sess = _session(node, [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                    helper.make_tensor_value_info("y", tdt, None), inits)
    return sess.run(None, {"ids": ids})[0]


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("e", [256, 224])  # 224 / 32 = 7 blocks: odd, so 4-bit zero points pad each row
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_matches_dequantized(bits, symmetric, e, scale_dtype):
    v = 50
    spec = Q.QuantSpec(bits=bits, block_size=32, symmetric=symmetric, embedding=True)
    table = _weight(v, e, seed=5)
    q = Q.quantize_embedding(table, spec, scale_dtype=scale_dtype)
    assert q.packed.dtype == np.uint8 and q.packed.shape == (v, e * bits // 8)
    assert q.scales.shape == (v, e // 32) and q.scales.dtype == scale_dtype
    ids = np.array([3, 0, 49, 3, 17], np.int64)
    deq = Q.dequantize_embedding(q, v, e, spec)
    y = _run_gather(q, spec, ids)
    assert y.shape == (len(ids), e)
    atol = 1e-7 if scale_dtype == np.float32 else 1e-4  # fp16 output rounding of |values| < 0.1
    np.testing.assert_allclose(y.astype(np.float32), deq[ids], rtol=0, atol=atol)
    assert np.abs(deq - table).max() < (0.01 if bits == 4 else 0.001)  # a real reconstruction, not zeros



def test_embedding_is_rtn_even_for_hqq_specs():
    table = _weight(40, 128, seed=6)
    hqq = Q.quantize_embedding(table, Q.QuantSpec(method="hqq", embedding=True))
    rtn = Q.quantize_embedding(table, Q.QuantSpec(method="rtn", embedding=True))
    np.testing.assert_array_equal(hqq.packed, rtn.packed)
    np.testing.assert_array_equal(hqq.zero_points, rtn.zero_points)
    assert hqq.zero_points.dtype == np.uint8  # GatherBlockQuantized takes no float zero points


# --- QuantSpec ---------------------------------------------------------------------------------

def test_valid_spec_passes_and_round_trips():
    config = tiny_config()
    for spec in (Q.QuantSpec(), Q.QuantSpec(bits=8, symmetric=True, block_size=16, accuracy_level=0),
                 Q.QuantSpec(method="hqq", block_size=32, embedding=True, lm_head=False)):
        spec.check(config)
        assert Q.QuantSpec.from_json(spec.to_json()) == spec
    assert Q.QuantSpec().label == "int4-rtn-asym-b32"
    assert Q.QuantSpec(bits=8, symmetric=True, block_size=128).label == "int8-rtn-sym-b128"
    assert Q.matmul_nbits_attributes(64, 96, Q.QuantSpec()) == {
        "K": 64, "N": 96, "bits": 4, "block_size": 32, "accuracy_level": 4}


@pytest.mark.parametrize("kwargs,config_kwargs,needles", [
    (dict(bits=3), {}, ["bits 3"]),
    (dict(bits=2), {}, ["bits 2"]),
    (dict(block_size=48), dict(hidden_size=256, num_attention_heads=16, intermediate_size=512),
     ["block size 48 must be a power of two", "block size 48 does not divide hidden_size 256"]),
    (dict(block_size=8), {}, ["block size 8 must be a power of two between 16 and 256"]),
    (dict(block_size=512), {}, ["block size 512"]),
    (dict(block_size=64), {}, ["block size 64 does not divide intermediate_size 160"]),
    (dict(block_size=32), dict(hidden_size=80, intermediate_size=160), ["block size 32 does not divide hidden_size 80"]),
    (dict(method="gptq"), {}, ["'gptq'"]),
    (dict(accuracy_level=5), {}, ["accuracy_level 5"]),
    (dict(accuracy_level=-1), {}, ["accuracy_level -1"]),
    (dict(method="hqq", symmetric=True), {}, ["hqq", "asymmetric by nature"]),
])
def test_check_errors(kwargs, config_kwargs, needles):
    spec = Q.QuantSpec(**kwargs)
    with pytest.raises(DeployError) as info:
        spec.check(tiny_config(**config_kwargs))
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_q_size_named_in_error():
    # hidden 64 but 2 heads x 24 = q_size 48: only o_proj's K breaks a block size of 32.
    with pytest.raises(DeployError, match="block size 32 does not divide q_size 48"):
        Q.QuantSpec(block_size=32).check(tiny_config(num_attention_heads=2, num_key_value_heads=2, head_dim=24))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(bits="4"), "bits"), (dict(bits=True), "bits"), (dict(block_size=32.0), "block_size"),
    (dict(symmetric=1), "symmetric"), (dict(method=4), "method"), (dict(embedding="yes"), "embedding"),
])
def test_post_init_type_errors(kwargs, needle):
    with pytest.raises(DeployError, match=needle):
        Q.QuantSpec(**kwargs)


def test_from_json_refuses_unknown_keys():
    with pytest.raises(DeployError, match="group_size"):
        Q.QuantSpec.from_json({"bits": 4, "group_size": 32})


@pytest.mark.parametrize("spec", [Q.QuantSpec(bits=4), Q.QuantSpec(bits=4, symmetric=True), Q.QuantSpec(bits=8),
                                  Q.QuantSpec(bits=4, method="hqq"), Q.QuantSpec(bits=8, method="hqq", block_size=16)])
def test_declared_layout_matches_quantized_tensors(spec):
    w = np.random.default_rng(0).normal(0, 0.02, (256, 96)).astype(np.float32)
    for q, embedding in ((Q.quantize_matrix(w, spec), False), (Q.quantize_embedding(w.T, spec), True)):
        layout = Q.quantized_layout(256, 96, spec, embedding=embedding)
        got = {part: getattr(q, part) for part in ("packed", "scales", "zero_points") if getattr(q, part) is not None}
        assert set(got) == set(layout)
        for part, (shape, kind) in layout.items():
            assert got[part].shape == shape and (got[part].dtype == np.uint8) == (kind == "uint8"), part
