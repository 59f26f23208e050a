"""Validate an exported graph: onnx.checker, the I/O contract, then ONNX Runtime vs PyTorch numerically.

The PyTorch reference runs in fp32 and is streamed: one block's attention, one chunk of its MLP's weight rows
and one slice of the output head are resident at a time, so validating a 70B-wide block stays within a few GB.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from llama3_deploy import contract
from llama3_deploy.config import LlamaConfig
from llama3_deploy.dtypes import FROM_ONNX, numpy_dtype, onnx_type
from llama3_deploy.errors import ValidationError

from .model import Attention, RMSNorm, additive_mask, rope_cos_sin
from .weights import WeightSource, derived_tensors, name_table, target_chunks, target_tensor


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Pass when max|onnx - ref| <= atol + rtol * max|ref|, per output tensor, against an fp32 reference."""

    atol: float
    rtol: float


# fp32 is expected to agree to rounding; fp16/bf16 carry their storage and matmul rounding, compounding over depth.
TOLERANCES = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4),
    "float16": Tolerance(atol=2e-2, rtol=2e-2),
    "bfloat16": Tolerance(atol=1e-1, rtol=5e-2),
}
# Quantized graphs are checked against a reference holding the same dequantized weights, so only the kernels
# differ; MatMulNBits accuracy_level 4 also quantizes activations to int8 per block, hence the wider bound.
INT8_COMPUTE_TOLERANCE = Tolerance(atol=5e-2, rtol=5e-2)
HEAD_CHUNK_ROWS = 8192  # output-head rows resident at once in the streamed reference


def portable_initializers(config: LlamaConfig, dtype: str) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, ONNX data type) of the checkpoint weights in a portable graph."""
    return {e.target: (e.target_shape, onnx_type(dtype)) for e in name_table(config)}


def check_structure(model_path: Path, io: contract.DecoderIO, weights: dict[str, tuple[tuple[int, ...], int]]) -> dict:
    """onnx.checker with external data, the graph's I/O against the contract, and each expected weight's
    shape and type; no weight values loaded."""
    import onnx

    try:
        onnx.checker.check_model(str(model_path), full_check=False)
    except Exception as e:
        raise ValidationError(f"onnx.checker rejected {model_path}: {e}") from None
    proto = onnx.load(str(model_path), load_external_data=False)
    problems = []
    for values, specs in ((proto.graph.input, io.inputs), (proto.graph.output, io.outputs)):
        got = [(v.name, FROM_ONNX.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]
        want = [(s.name, s.dtype, s.shape) for s in specs]
        if got != want:
            diff = [f"{g} != {w}" for g, w in zip(got, want) if g != w] or [f"{len(got)} vs {len(want)} tensors"]
            problems.append("; ".join(diff[:3]))
    if problems:
        raise ValidationError(f"graph I/O differs from the contract: {' | '.join(problems)}")
    inits = {i.name: i for i in proto.graph.initializer}
    for name, (shape, data_type) in weights.items():
        init = inits.get(name)
        if init is None or tuple(init.dims) != tuple(shape) or init.data_type != data_type:
            got = None if init is None else (tuple(init.dims), init.data_type)
            raise ValidationError(f"weight {name}: graph has {got}, expected {tuple(shape)} type {data_type}")
    locations = {kv.value for i in inits.values() for kv in i.external_data if kv.key == "location"}
    if any(Path(loc).name != loc for loc in locations):  # external data must stay inside the model directory
        raise ValidationError(f"external data outside the model directory: {sorted(locations)}")
    return {"onnx_checker": "passed", "io_contract": "matched", "weights": "all present with expected shapes",
            "initializers": len(inits), "external_data_files": sorted(locations)}


@torch.no_grad()
def streamed_reference(source: WeightSource, config: LlamaConfig, input_ids, attention_mask, position_ids, past):
    """The decoder's forward in fp32 with one block resident at a time; returns (logits, presents)."""
    table = {e.target: e for e in name_table(config)}
    f32 = torch.float32

    def load(module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        state = {k: target_tensor(source, table[prefix + k], f32) for k, _ in module.named_parameters()}
        module.load_state_dict(state, assign=True)
        return module

    embed_name = table["embed"].source
    x = torch.stack([source.get_rows(embed_name, int(t), int(t) + 1)[0].to(f32) for t in input_ids.flatten()])
    x = x.view(*input_ids.shape, config.hidden_size)
    cos, sin = rope_cos_sin(derived_tensors(config)["rope_inv_freq"], position_ids)
    mask = additive_mask(attention_mask, past[0].shape[2], input_ids.shape[1])
    presents = []
    for i in range(config.num_hidden_layers):  # Block.forward, with the MLP streamed (_streamed_mlp)
        p = f"layers.{i}."
        with torch.device("meta"):
            attn, attn_norm, mlp_norm = (Attention(config), RMSNorm(config.hidden_size, config.rms_norm_eps),
                                         RMSNorm(config.hidden_size, config.rms_norm_eps))
        a, k, v = load(attn, p + "attn.")(load(attn_norm, p + "attn_norm.")(x), cos, sin, mask,
                                          past[2 * i].float(), past[2 * i + 1].float())
        x = x + a
        x = x + _streamed_mlp(source, table, p + "mlp.", load(mlp_norm, p + "mlp_norm.")(x))
        presents += [k, v]
        del attn
    with torch.device("meta"):
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    h = load(norm, "norm.")(x)
    head = table["embed"] if config.tie_word_embeddings else table["lm_head"]
    chunks = [h @ source.get_rows(head.source, lo, lo + HEAD_CHUNK_ROWS).to(f32).t()
              for lo in range(0, config.vocab_size, HEAD_CHUNK_ROWS)]
    return torch.cat(chunks, dim=-1), presents


def _streamed_mlp(source: WeightSource, table: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """MLP.forward, silu(x @ gate) * (x @ up) @ down, reading weights a chunk of rows at a time (target_chunks): a
    70B block's MLP is 2.8 GB in fp32, a chunk at most 0.5 GB. Gate and up go by intermediate channels, down by its
    output channels (a checkpoint's rows are a Linear's outputs)."""
    gate, up, down = (target_chunks(source, table[prefix + n], torch.float32) for n in ("w_gate", "w_up", "w_down"))
    h = torch.cat([torch.nn.functional.silu(x @ g) * (x @ u) for (_, g), (_, u) in zip(gate, up)], dim=-1)
    return torch.cat([h @ d for _, d in down], dim=-1)


def _compare(name: str, got: np.ndarray, ref: torch.Tensor, tol: Tolerance) -> dict:
    ref_np = ref.float().numpy()
    if got.shape != ref_np.shape:
        return {"tensor": name, "ok": False, "error": f"shape {got.shape} != {ref_np.shape}"}
    diff = float(np.abs(got.astype(np.float32) - ref_np).max()) if got.size else 0.0
    scale = float(np.abs(ref_np).max()) if ref_np.size else 0.0
    limit = tol.atol + tol.rtol * scale
    return {"tensor": name, "ok": bool(diff <= limit and np.isfinite(got).all()), "max_abs_diff": diff,
            "ref_max_abs": scale, "limit": limit}


def validation_inputs(config: LlamaConfig, *, batch: int = 2, prompt: int = 6, seed: int = 0):
    """A left-padded batch: row 1 has two pad positions. Returns (ids, mask, positions)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=g)
    mask = torch.ones(batch, prompt, dtype=torch.int64)
    if batch > 1:
        mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def check_numerics(model_path: Path, source: WeightSource, spec, *, providers: list[str] | None = None) -> dict:
    """Run a prefill and one decode step fed its own past through ONNX Runtime and the fp32 reference.

    Raises ValidationError with the figures if any logits or present key/value is off tolerance.
    """
    import onnxruntime as ort

    config, dtype, io = spec.config, spec.dtype, spec.io  # spec: export.spec.ExportSpec
    tol = TOLERANCES[dtype]
    np_dtype = numpy_dtype(dtype)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Validation runs a handful of tokens: no arena (on the CPU EP it would keep the fp32 copies ORT casts
    # fp16 weights to, i.e. twice the model) and no prepacked weight copies.
    opts.enable_cpu_mem_arena = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(model_path), opts, providers=providers or ["CPUExecutionProvider"])

    ids, mask, pos = validation_inputs(config)
    b = ids.shape[0]
    next_ids = torch.tensor([[7 % config.vocab_size]] * b)
    step_inputs = [(ids, mask, pos),
                   (next_ids, torch.cat([mask, torch.ones(b, 1, dtype=torch.int64)], 1), pos[:, -1:] + 1)]
    # ONNX Runtime first, both steps, then free it: the reference never shares memory with the session.
    onnx_outputs = []
    onnx_past = [np.zeros((b, config.num_key_value_heads, 0, config.head_dim), np_dtype) for _ in io.past_names]
    for s_ids, s_mask, s_pos in step_inputs:
        feed = {contract.INPUT_IDS: s_ids.numpy(), contract.ATTENTION_MASK: s_mask.numpy(),
                contract.POSITION_IDS: s_pos.numpy(), **dict(zip(io.past_names, onnx_past))}
        onnx_outputs.append(session.run(None, feed))
        onnx_past = onnx_outputs[-1][1:]
    del session, onnx_past

    steps = []
    ref_past = [torch.zeros(b, config.num_key_value_heads, 0, config.head_dim) for _ in io.past_names]
    for step, ((s_ids, s_mask, s_pos), outputs) in enumerate(zip(step_inputs, onnx_outputs)):
        ref_logits, ref_present = streamed_reference(source, config, s_ids, s_mask, s_pos, ref_past)
        results = [_compare(contract.LOGITS, outputs[0], ref_logits, tol)]
        results += [_compare(n, o, r, tol) for n, o, r in zip(io.present_names, outputs[1:], ref_present)]
        steps.append(_step_figures("prefill" if step == 0 else "decode", int(s_ids.shape[1]), results))
        ref_past = ref_present
    figures = {"dtype": dtype, "tolerance": dataclasses.asdict(tol), "layers_validated": config.num_hidden_layers,
               "providers": providers or ["CPUExecutionProvider"], "steps": steps}
    _raise_on_failure(steps, dtype, tol)
    return figures


def _step_figures(step: str, tokens: int, results: list[dict]) -> dict:
    """One step's summary: logits diff (the first result), the worst tensor relative to its limit, failures."""
    worst = max(results, key=lambda r: r.get("max_abs_diff", float("inf")) / max(r.get("limit", 1.0), 1e-30))
    return {"step": step, "tokens": tokens, "logits_max_abs_diff": results[0].get("max_abs_diff"),
            "worst_tensor": worst["tensor"], "worst_max_abs_diff": worst.get("max_abs_diff"),
            "worst_limit": worst.get("limit"), "ok": all(r["ok"] for r in results),
            "failures": [r for r in results if not r["ok"]][:5]}


def _raise_on_failure(steps: list[dict], dtype: str, tol: Tolerance) -> None:
    if not all(s["ok"] for s in steps):
        bad = [f"{s['step']}: {f['tensor']} max|diff|={f.get('max_abs_diff', f.get('error'))} "
               f"limit={f.get('limit')}" for s in steps for f in s["failures"]]
        raise ValidationError("exported graph drifts from PyTorch beyond the "
                              f"{dtype} tolerance (atol {tol.atol}, rtol {tol.rtol}): " + "; ".join(bad[:6]))


def numeric_providers(dtype: str) -> list[str] | None:
    """Providers that can run a dtype here, or None when none can (bf16 needs CUDA in ONNX Runtime)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if dtype != "bfloat16":
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else None


class DequantizedSource:
    """A weight source whose projections read back as dequantize(quantize(w)): the reference for a quantized graph.

    MatMulNBits blocks run along each output column's input axis, so quantizing a checkpoint row (one output
    column) alone gives the same values as quantizing the fused projection it ends up in.
    """

    def __init__(self, source: WeightSource, spec):
        self.source, self.spec, self.config = source, spec, source.config
        self.description = f"{source.description}, dequantized {spec.label}"
        table = name_table(source.config)
        self.shapes = {e.source: e.source_shape for e in table}
        # The table's transposed entries are the Linear weights: every projection, and the head unless tied.
        self.linear = {e.source for e in table if e.transpose and (spec.lm_head or e.target != "lm_head")}
        self.embedding = {e.source for e in table if e.target == "embed"} if spec.embedding else set()

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        from .quantize import dequantize_embedding, dequantize_matrix, quantize_embedding, quantize_matrix

        rows = self.source.get_rows(name, start, stop)
        if name in self.linear:  # rows are output columns: [n, K] -> quantize as [K, n]
            w = rows.float().t().contiguous().numpy()
            q = quantize_matrix(w, self.spec)
            return torch.from_numpy(dequantize_matrix(q, w.shape[0], w.shape[1], self.spec)).t().contiguous()
        if name in self.embedding:
            t = rows.float().numpy()
            q = quantize_embedding(t, self.spec)
            return torch.from_numpy(dequantize_embedding(q, t.shape[0], t.shape[1], self.spec))
        return rows

    def get(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        return self.get_rows(name, 0, shape[0]) if len(shape) == 2 else self.source.get(name)


def check_numerics_optimized(model_path: Path, source: WeightSource, spec, *,
                             providers: list[str] | None = None) -> dict:
    """Drive the optimized graph through the runtime's own cache and step code, against the streamed fp32
    reference. `spec` is the export.spec.ExportSpec the graph was built from (its contract: spec.io).

    The runtime's SharedKV: one [B, K, M, D] buffer per past/present pair, bound as both input and output;
    each row prefilled alone into its slot (prefill_row), then one batched decode step. Compares logits and
    the cached keys/values (which hold rotated keys, like the reference's present); with argmax, the graph's
    greedy ids must equal the argmax of its own logits exactly.
    """
    from llama3_deploy.runtime.kv import allocate
    from llama3_deploy.runtime.session import DecoderSession

    config, dtype, quant = spec.config, spec.dtype, spec.quantization
    tol = TOLERANCES[dtype]
    if quant is not None:
        tol = INT8_COMPUTE_TOLERANCE if quant.accuracy_level == 4 else tol
    ref_source = source if quant is None else DequantizedSource(source, quant)
    providers = providers or ["CPUExecutionProvider"]
    session = DecoderSession(model_path, config=config, dtype=dtype, io=spec.io, flavor=spec.flavor,
                             logits=spec.logits, argmax=spec.argmax, low_memory=True,
                             device="cuda" if providers[0].startswith("CUDA") else "cpu")

    ids, mask, pos = validation_inputs(config)
    B, S = ids.shape
    pads = [int(p) for p in (S - mask.sum(1))]
    lens = [S - p for p in pads]
    K, D, V, M = config.num_key_value_heads, config.head_dim, config.vocab_size, S + 3
    cache = allocate(session, B, M, S)  # capacity M = S + 3; every prompt fits one prefill chunk
    argmax_mismatches = []

    def read(rows: str, new_tokens: int) -> np.ndarray:
        """The last run's logits [n, L, V] (a copy: the next run reuses the buffer), its greedy ids checked."""
        out = cache.output(full=True).copy()
        if spec.argmax and not np.array_equal(cache.output(ids_only=True, full=True), out.argmax(-1)):
            argmax_mismatches.append(f"rows {rows}, {new_tokens} new tokens")
        return out

    prefill_logits = []
    for r in range(B):
        cache.prefill_row(r, ids[r, pads[r]:].tolist())
        prefill_logits.append(read(f"{r}..{r}", lens[r]))
    next_ids = np.full((B, 1), 7 % V, np.int64)
    cache.decode(next_ids[:, 0])
    decode_logits = read(f"0..{B - 1}", 1)
    kv = [t.copy() for t in cache.tensors()]  # [B, K, M, D] per present output
    session = cache = None  # free ONNX Runtime before the reference runs
    if argmax_mismatches:
        raise ValidationError(f"{contract.NEXT_TOKEN} differs from the argmax of the graph's logits: "
                              + "; ".join(argmax_mismatches))

    ref_prefill, ref_past = streamed_reference(ref_source, config, ids, mask, pos,
                                               [torch.zeros(B, K, 0, D) for _ in spec.io.past_names])
    ref_decode, ref_present = streamed_reference(
        ref_source, config, torch.from_numpy(next_ids), torch.cat([mask, torch.ones(B, 1, dtype=torch.int64)], 1),
        pos[:, -1:] + 1, ref_past)
    del ref_past
    prefill = []
    for r in range(B):
        ref = ref_prefill[r:r + 1, pads[r]:] if spec.logits == "all" else ref_prefill[r:r + 1, -1:]
        prefill.append(_compare(f"{contract.LOGITS}[row {r}]", prefill_logits[r], ref, tol))
    decode = [_compare(contract.LOGITS, decode_logits, ref_decode, tol)]
    for buf, name, ref in zip(kv, spec.io.present_names, ref_present):
        for r in range(B):
            decode.append(_compare(f"{name}[row {r}]", buf[r, :, :lens[r] + 1], ref[r, :, pads[r]:], tol))
    steps = [_step_figures("prefill", S, prefill), _step_figures("decode", 1, decode)]
    figures = {"dtype": dtype, "tolerance": dataclasses.asdict(tol), "layers_validated": config.num_hidden_layers,
               "reference": ref_source.description, "providers": providers,
               "steps": steps, **({"next_token": "equals argmax(logits) at every step"} if spec.argmax else {})}
    _raise_on_failure(steps, dtype, tol)
    return figures
