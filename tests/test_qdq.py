"""Q/DQ insertion for TensorRT explicit quantization (calibration/qdq.py) and its readiness check (trt_check.py).

A tiny random fp32 portable export (2 layers) is calibrated by running it on a few random prompts (max |x| of
every projection's input), then rewritten to INT8 and FP8 Q/DQ, saved with external data and run in ONNX
Runtime's CPU provider, which runs int8 and float8 E4M3 QuantizeLinear/DequantizeLinear.
"""
from __future__ import annotations

import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llama3_deploy.calibration import qdq
from llama3_deploy.calibration.trt_check import check_tensorrt_ready, require_tensorrt_ready
from llama3_deploy.contract import DATA_FILE, MODEL_FILE
from llama3_deploy.errors import DeployError, ValidationError
from llama3_deploy.export import onnx_export
from llama3_deploy.export.spec import ExportSpec
from llama3_deploy.export.validate import validation_inputs
from llama3_deploy.export.weights import RandomWeights
from tests.conftest import tiny_config

CONFIG = tiny_config()
# Relative logits error max|q - fp32| / max|fp32| on the validation batch (amax calibrated on other prompts).
# Measured (onnxruntime 1.32 CPU): int8 1.8%, fp8 5.5%. Random weights give Gaussian-like activations, where a
# per-tensor int8 step of amax/127 is ~1% of their RMS; E4M3's 3 mantissa bits give each weight and activation
# a relative error of up to 1/16, which dot products do not average away relative to their output.
REL_TOL = {"int8": 0.03, "fp8": 0.08}
# Greedy continuation of a short prompt: share of the 8 generated tokens equal to fp32's (measured: all 8).
GREEDY_AGREEMENT = {"int8": 0.75, "fp8": 0.75}
# Ours vs onnxruntime.quantization.quantize_static on the same calibration prompts and layout: the same math
# (symmetric, per-channel weights, amax / 127, round half to even), so the logits may differ only by rounding
# ties and summation order. Measured: bit-identical.
ORT_AGREEMENT_REL = 1e-4


def _build() -> onnx_export.ir.Model:
    spec = ExportSpec.make(CONFIG, dtype="float32", flavor="portable")
    model = onnx_export.trace(spec)
    onnx_export.attach_weights(model, RandomWeights(CONFIG, seed=3, dtype="float32"), CONFIG, "float32")
    return model


def _save(model, path):
    path.mkdir(parents=True, exist_ok=True)
    return onnx_export.save(model, path)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, ids: np.ndarray, mask=None, pos=None) -> dict:
    b, s = ids.shape
    mask = np.ones((b, s), np.int64) if mask is None else mask
    pos = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)) if pos is None else pos
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.ascontiguousarray(pos)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = np.zeros((b, CONFIG.num_key_value_heads, 0, CONFIG.head_dim), dtype)
    return feeds


def _logits(sess, ids, mask=None, pos=None) -> np.ndarray:
    return sess.run(["logits"], _feeds(sess, ids, mask, pos))[0]


def _greedy(sess, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):  # full recompute each step: the prompt is short
        ids.append(int(_logits(sess, np.array([ids], np.int64))[0, -1].argmax()))
    return ids[len(prompt):]


def _calibration_prompts() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, CONFIG.vocab_size, (2, 8), dtype=np.int64) for _ in range(4)]


@pytest.fixture(scope="module")
def base():
    return _build()


@pytest.fixture(scope="module")
def fp32(base, tmp_path_factory):
    """The fp32 export, the name of each projection's activation input, and amax calibrated on it."""
    out = tmp_path_factory.mktemp("fp32")
    path = _save(base.clone(), out)
    acts = {n.inputs[1].name: n.inputs[0].name for n in base.graph
            if n.op_type == "MatMul" and qdq.PROJECTION.match(n.inputs[1].name or "")}
    proto = onnx.load(str(path), load_external_data=False)
    for name in sorted(set(acts.values())):  # expose the activations as extra outputs (same data file)
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    onnx.save(proto, str(out / "calib.onnx"))
    sess = _session(out / "calib.onnx")
    names = sorted(set(acts.values()))
    peak = dict.fromkeys(names, 0.0)
    for ids in _calibration_prompts():
        for name, x in zip(names, sess.run(names, _feeds(sess, ids))):
            peak[name] = max(peak[name], float(np.abs(x).max()))
    return {"path": path, "acts": acts, "amax": {w: peak[a] for w, a in acts.items()}}


@pytest.fixture(scope="module")
def quantized(base, fp32, tmp_path_factory):
    """fmt -> saved Q/DQ model path (every projection, lm_head included)."""
    out = {}
    for fmt in qdq.FORMATS:
        model = qdq.insert_qdq(base.clone(), input_amax=fp32["amax"], fmt=fmt)
        out[fmt] = _save(model, tmp_path_factory.mktemp(fmt))
    return out


@pytest.mark.parametrize("fmt", list(qdq.FORMATS))
def test_qdq_graph_is_valid_ready_and_close_to_fp32(fmt, fp32, quantized):
    path = quantized[fmt]
    onnx.checker.check_model(str(path), full_check=True)  # with its external data
    assert check_tensorrt_ready(path) == []
    proto = onnx.load(str(path), load_external_data=False)
    record = qdq.qdq_record(proto)
    weights = sorted(fp32["acts"])
    assert sorted(record["weights"]) == weights and record["format"] == fmt
    assert {o.version for o in proto.opset_import if o.domain == ""} == {19 if fmt == "fp8" else 18}
    qtype = TensorProto.INT8 if fmt == "int8" else TensorProto.FLOAT8E4M3FN
    inits = {t.name: t for t in proto.graph.initializer}
    assert all(inits[w].data_type == qtype for w in weights)
    ops = [n.op_type for n in proto.graph.node]
    # One DQ per weight; one Q/DQ pair per activation tensor: per layer q/k/v share one, gate/up share one.
    pairs = len(set(fp32["acts"].values()))
    assert pairs == 4 * CONFIG.num_hidden_layers + 1
    assert ops.count("QuantizeLinear") == pairs and ops.count("DequantizeLinear") == len(weights) + pairs
    assert set(record["activations"]) == set(fp32["acts"].values())

    ref, got = _session(fp32["path"]), _session(path)
    ids, mask, pos = (t.numpy() for t in validation_inputs(CONFIG, batch=2, prompt=6, seed=0))
    want, have = _logits(ref, ids, mask, pos), _logits(got, ids, mask, pos)
    rel = float(np.abs(have - want).max() / np.abs(want).max())
    assert 0 < rel < REL_TOL[fmt], rel
    prompt = [5, 17, 99, 3, 250]
    same = np.mean(np.array(_greedy(got, prompt, 8)) == np.array(_greedy(ref, prompt, 8)))
    assert same >= GREEDY_AGREEMENT[fmt], same


def test_two_runs_write_identical_files(fp32, quantized, tmp_path):
    again = qdq.insert_qdq(_build(), input_amax=fp32["amax"], fmt="int8")  # a fresh trace, not a clone
    path = _save(again, tmp_path)
    first = quantized["int8"].parent
    assert (tmp_path / MODEL_FILE).read_bytes() == (first / MODEL_FILE).read_bytes()
    assert (tmp_path / DATA_FILE).read_bytes() == (first / DATA_FILE).read_bytes()
    assert path.name == MODEL_FILE


def test_each_weight_is_quantized_once_while_streaming(base, fp32, tmp_path, monkeypatch):
    calls, alive, peak = {}, [0], [0]
    real = qdq.quantize_weight

    def counting(weight, fmt, **kw):
        peak[0] = max(peak[0], alive[0])  # quantized weights still resident when the next one starts
        codes, scales = real(weight, fmt, **kw)
        calls[weight.shape] = calls.get(weight.shape, 0) + 1
        alive[0] += 1
        weakref.finalize(codes, lambda: alive.__setitem__(0, alive[0] - 1))
        return codes, scales

    monkeypatch.setattr(qdq, "quantize_weight", counting)
    model = qdq.insert_qdq(base.clone(), input_amax=fp32["amax"], fmt="fp8")
    assert not calls  # inserting reads no weight
    _save(model, tmp_path)
    n = len(fp32["amax"])
    assert sum(calls.values()) == n, calls  # once per weight: codes and scales come from one quantization
    assert peak[0] <= 1, peak  # the memo keeps at most the previous weight


def test_quantize_weight_layout():
    w = np.random.default_rng(0).standard_normal((32, 5)).astype(np.float32)
    w[:, 2] *= 100  # per-column scales: a large column does not coarsen the others
    w[:, 4] = 0
    codes, scales = qdq.quantize_weight(w, "int8")
    assert codes.dtype == np.int8 and scales.shape == (5,) and np.abs(codes).max() == 127
    np.testing.assert_allclose(scales[:4], np.abs(w[:, :4]).max(0) / 127, rtol=1e-6)
    assert scales[4] == 1 and not codes[:, 4].any()
    assert np.all(np.abs(codes * scales - w) <= scales / 2 + 1e-7)
    f8, s8 = qdq.quantize_weight(w.astype(np.float16), "fp8", scale_dtype=np.float16)
    assert str(f8.dtype) == "float8_e4m3fn" and s8.dtype == np.float16
    assert np.isfinite(f8.astype(np.float32)).all() and np.abs(f8.astype(np.float32)).max() == 448


def test_fp16_graph_takes_fp16_scales_and_opset_19(base, fp32, tmp_path):
    spec = ExportSpec.make(CONFIG, dtype="float16", flavor="portable")
    model = onnx_export.trace(spec)
    onnx_export.attach_weights(model, RandomWeights(CONFIG, seed=3, dtype="float32"), CONFIG, "float16")
    amax = {w: a for w, a in fp32["amax"].items() if w.startswith("layers.0.")}  # a subset: layer 0 only
    qdq.insert_qdq(model, input_amax=amax, fmt="int8")
    path = _save(model, tmp_path)
    onnx.checker.check_model(str(path), full_check=True)
    assert check_tensorrt_ready(path) == []
    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits["layers.0.attn.wq.scale"].data_type == TensorProto.FLOAT16
    assert inits["layers.1.attn.wq"].data_type == TensorProto.FLOAT16  # not calibrated: left in float
    assert qdq.qdq_record(proto)["opset"] == 19
    sess = _session(path)
    assert np.isfinite(_logits(sess, np.array([[1, 2, 3]], np.int64))).all()


def test_bad_inputs_are_refused(base, fp32):
    with pytest.raises(DeployError, match="unknown quantization format"):
        qdq.insert_qdq(base.clone(), input_amax=fp32["amax"], fmt="int4")
    with pytest.raises(DeployError, match="finite and positive"):
        qdq.insert_qdq(base.clone(), input_amax={"lm_head": 0.0}, fmt="int8")
    with pytest.raises(DeployError, match="no projection"):
        qdq.insert_qdq(base.clone(), input_amax={"layers.7.attn.wq": 1.0}, fmt="int8")
    with pytest.raises(DeployError, match="no calibrated input amax"):
        qdq.insert_qdq(base.clone(), input_amax={}, fmt="int8", weights=["lm_head"])
    with pytest.raises(DeployError, match="not only as a MatMul weight"):
        qdq.insert_qdq(base.clone(), input_amax={"embed": 1.0}, fmt="int8", weights=["embed"])


# --- The readiness check, one rule at a time, on a minimal x -> Q/DQ -> MatMul(DQ(W)) graph ----------------------
def _tiny_qdq(*, zp=0, axis=1, fp8=False, opset=19, transpose=False, op=None, q_to_dq=True) -> onnx.ModelProto:
    """Valid by default; each argument breaks one rule."""
    qtype = TensorProto.FLOAT8E4M3FN if fp8 else TensorProto.INT8
    k, n = 8, 4

    def qtensor(name, dims, values):
        if fp8:
            import ml_dtypes
            raw = np.asarray(values, np.float32).astype(ml_dtypes.float8_e4m3fn).tobytes()
            return helper.make_tensor(name, qtype, dims, raw, raw=True)
        return numpy_helper.from_array(np.asarray(values, np.int8).reshape(dims), name)

    w = np.arange(k * n).reshape((n, k) if transpose else (k, n)) % 7 - 3
    inits = [qtensor("W", list(w.shape), w), qtensor("x.zp", [], zp),
             numpy_helper.from_array(np.full(k if axis in (0, -2) else n, 0.1, np.float32), "W.scale"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x.scale")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zp"], ["x.q"], name="x.q")]
    nodes.append(helper.make_node("DequantizeLinear", ["x.q", "x.scale", "x.zp"], ["x.dq"], name="x.dq") if q_to_dq
                 else helper.make_node("Cast", ["x.q"], ["x.dq"], to=TensorProto.FLOAT, name="x.cast"))
    weight = "W"
    if transpose:
        nodes.append(helper.make_node("Transpose", ["W"], ["W.t"], name="W.t"))
        weight = "W.t"
    nodes += [helper.make_node("DequantizeLinear", [weight, "W.scale"], ["W.dq"], axis=axis, name="W.dq"),
              helper.make_node("MatMul", ["x.dq", "W.dq"], ["y0"], name="mm")]
    nodes.append(helper.make_node(*op, ["y0"], ["y"], name="extra", domain="com.microsoft") if op
                 else helper.make_node("Identity", ["y0"], ["y"], name="out"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _problems(**kw) -> str:
    found = check_tensorrt_ready(_tiny_qdq(**kw))
    assert found, f"{kw} was not flagged"
    return " | ".join(found)


@pytest.mark.parametrize("fp8", [False, True])
def test_minimal_qdq_graph_is_ready_and_runs(fp8):
    model = _tiny_qdq(fp8=fp8)
    onnx.checker.check_model(model, full_check=True)
    assert check_tensorrt_ready(model) == []
    require_tensorrt_ready(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((2, 8), np.float32)})[0].shape == (2, 4)


def test_check_flags_nonzero_zero_point():
    assert "zero point x.zp is not zero" in _problems(zp=3)


def test_check_flags_per_channel_axis_on_input_dimension():
    assert "per-channel axis 0 on weight W" in _problems(axis=0)


def test_check_flags_float8_below_opset_19():
    assert "float8 types need opset >= 19" in _problems(fp8=True, opset=18)


def test_check_flags_op_between_quantized_initializer_and_dq():
    found = _problems(transpose=True, axis=1)
    assert "int8 initializer W is read by Transpose 'W.t'" in found
    assert "DequantizeLinear 'W.dq': reads W.t, the output of Transpose" in found


def test_check_flags_contrib_op():
    assert "domain 'com.microsoft'" in _problems(op=("FastGelu",))


def test_check_flags_quantize_without_dequantize():
    assert "QuantizeLinear 'x.q': its output feeds Cast" in _problems(q_to_dq=False)


def test_require_raises_validation_error_listing_problems():
    with pytest.raises(ValidationError, match="zero point x.zp is not zero"):
        require_tensorrt_ready(_tiny_qdq(zp=3))


# --- Cross-check against onnxruntime.quantization -------------------------------------------------------------
def test_agrees_with_onnxruntime_quantize_static(fp32, quantized, tmp_path):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):  # the prompts our amax came from
        def __init__(self, sess):
            self.batches = iter(_feeds(sess, ids) for ids in _calibration_prompts())

        def get_next(self):
            return next(self.batches, None)

    proto = onnx.load(str(fp32["path"]), load_external_data=False)
    projections = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in fp32["acts"]]
    out = tmp_path / MODEL_FILE
    quantize_static(str(fp32["path"]), str(out), Reader(_session(fp32["path"])), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul"], nodes_to_quantize=projections,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "OpTypesToExcludeOutputQuantization": ["MatMul"]})
    theirs = onnx.load(str(out), load_external_data=False)
    ops = [n.op_type for n in theirs.graph.node]
    assert ops.count("QuantizeLinear") == len(set(fp32["acts"].values()))  # the same Q/DQ layout as ours
    # Their activation scales (MinMax, symmetric, amax / 127) equal ours.
    ours = qdq.qdq_record(onnx.load(str(quantized["int8"]), load_external_data=False))["activations"]
    scales = {t.name: numpy_helper.to_array(t) for t in theirs.graph.initializer if t.name.endswith("_scale")}
    for act, entry in ours.items():
        assert float(scales[f"{act}_scale"]) == pytest.approx(entry["scale"], rel=1e-6)

    ids, mask, pos = (t.numpy() for t in validation_inputs(CONFIG, batch=2, prompt=6, seed=0))
    a = _logits(_session(out), ids, mask, pos)
    b = _logits(_session(quantized["int8"]), ids, mask, pos)
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    assert rel < ORT_AGREEMENT_REL, rel
