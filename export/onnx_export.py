"""Trace the decoder on the meta device, then stream real weights into one external data file.

Tracing never touches weight values, so its memory does not depend on model size; saving pulls one
tensor at a time from the weight source (a lazily opened safetensors file or seeded random weights).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch

from llama3_deploy import contract
from llama3_deploy.contract import DATA_FILE, MODEL_FILE
from llama3_deploy.dtypes import onnx_type
from llama3_deploy.config import LlamaConfig

from .model import LlamaDecoder
from .spec import ExportSpec
from .weights import WeightSource, derived_tensors, name_table, target_tensor

OPSET = 18
# Write budget for the external data writer: with one worker this bounds the bytes held at once
# beyond the single tensor being converted.
WRITE_BUDGET_BYTES = 256 << 20
ALIGNMENT = 65536  # aligned external data lets ONNX Runtime map it directly
EXTERNAL_THRESHOLD_BYTES = 1024  # larger tensors go to the external data file


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def trace(spec: ExportSpec) -> ir.Model:
    """Export the decoder graph with meta weights; inputs, outputs and axes named by the spec's contract."""
    config, dtype, io = spec.config, spec.dtype, spec.trace_io
    tdtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = LlamaDecoder(config).to(tdtype)
        model.register_buffer("rope_inv_freq", torch.empty(config.head_dim // 2, dtype=torch.float32))
        b, s, p = 2, 3, 4  # example sizes; every axis is dynamic (sizes 0 and 1 included, see tests)
        ids = torch.zeros(b, s, dtype=torch.int64)
        mask = torch.ones(b, p + s, dtype=torch.int64)
        pos = torch.zeros(b, s, dtype=torch.int64)
        past = [torch.zeros(b, config.num_key_value_heads, p, config.head_dim, dtype=tdtype)
                for _ in range(2 * config.num_hidden_layers)]
    auto = torch.export.Dim.AUTO
    # forward(*past) makes torch.export see the past tensors as one nested tuple argument.
    dynamic = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (ids, mask, pos, *past), dynamo=True, optimize=False, verbose=False, opset_version=OPSET,
            input_names=[s.name for s in io.inputs], output_names=[s.name for s in io.outputs],
            dynamic_shapes=dynamic)
    m = program.model
    apply_contract(m, io)
    _optimize_without_weights(m, config)
    return m


def _optimize_without_weights(model: ir.Model, config: LlamaConfig) -> None:
    """Run onnxscript's optimizer (constant folding, shape simplification, dead code) on the graph alone.

    Checkpoint weights are detached first so the optimizer cannot touch their (meta) values; derived
    buffers get their real values so the rotary tables can fold.
    """
    import onnxscript

    table = {e.target for e in name_table(config)}
    for name, value in model.graph.initializers.items():
        value.const_value = None if name in table else value.const_value
    for name, tensor in derived_tensors(config).items():
        model.graph.initializers[name].const_value = ir.Tensor(tensor.numpy(), name=name)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    onnxscript.optimizer.optimize(model)


class _quiet_exporter:
    """Silence the exporter's progress prints (they go through logging and stdout)."""

    def __enter__(self):
        self._level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        import contextlib, io as _io
        self._redirect = contextlib.redirect_stdout(_io.StringIO())
        self._redirect.__enter__()

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        logging.getLogger("torch.onnx").setLevel(self._level)


def apply_contract(model: ir.Model, io: contract.DecoderIO) -> None:
    """Give graph inputs/outputs the contract's symbolic axis names; fail if names or dtypes differ."""
    for values, specs in ((model.graph.inputs, io.inputs), (model.graph.outputs, io.outputs)):
        got = [v.name for v in values]
        want = [s.name for s in specs]
        if got != want:
            raise RuntimeError(f"traced graph I/O {got} differs from the contract {want}")
        for v, spec in zip(values, specs):
            if v.dtype != ir.DataType(onnx_type(spec.dtype)):
                raise RuntimeError(f"{spec.name}: traced dtype {v.dtype}, contract {spec.dtype}")
            v.shape = ir.Shape(list(spec.shape))


def attach_weights(model: ir.Model, source: WeightSource, config: LlamaConfig, dtype: str) -> None:
    """Replace the traced meta initializers with lazy tensors that read the source on demand."""
    tdtype = getattr(torch, dtype)
    by_target = {e.target: e for e in name_table(config)}
    derived = derived_tensors(config)
    for name, value in model.graph.initializers.items():
        shape = ir.Shape(list(value.shape))
        if name in by_target:
            entry = by_target[name]
            if tuple(shape) != entry.target_shape:
                raise RuntimeError(f"initializer {name}: graph {tuple(shape)}, table {entry.target_shape}")
            fn: Callable = (lambda e=entry: ir.Tensor(_to_numpy(target_tensor(source, e, tdtype)), name=e.target))
            value.const_value = ir.LazyTensor(fn, dtype=value.dtype, shape=shape, name=name)
        elif name in derived:
            value.const_value = ir.Tensor(derived[name].numpy(), name=name)
        elif value.const_value is None:
            raise RuntimeError(f"traced initializer {name} is neither a checkpoint weight nor a derived buffer")
        # else: a small constant the optimizer folded; it already holds its value
    missing = set(by_target) - set(model.graph.initializers)
    if missing:
        raise RuntimeError(f"weights not used by the traced graph: {sorted(missing)[:5]}")


def initializer_layout(model: ir.Model) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, ONNX data type) of every initializer, for the structural check after saving."""
    return {name: (tuple(v.shape), int(v.dtype)) for name, v in model.graph.initializers.items()}


def _writer_options() -> dict:
    """One writer, a bounded in-flight budget, aligned data: onnx-ir 1.1's options. onnx-ir 1.0 (on the GPU
    machine) lacks them; it writes one tensor at a time anyway, and ONNX Runtime reads unaligned external data
    (by copying instead of mapping it), so there the export saves without them."""
    import inspect

    wanted = {"max_workers": 1, "max_in_flight_bytes": WRITE_BUDGET_BYTES, "alignment": ALIGNMENT}
    accepted = inspect.signature(ir.save).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def save(model: ir.Model, out_dir: str | os.PathLike, *, progress: bool = False, desc: str = "writing weights") -> Path:
    """Write model.onnx and its single external data file, one tensor at a time (a byte progress bar that
    ends at 100%: it counts exactly the tensors written as external data)."""
    from tqdm import tqdm

    out = Path(out_dir) / MODEL_FILE
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                if v.const_value is not None and v.const_value.nbytes > EXTERNAL_THRESHOLD_BYTES)
    pending = [0]  # the tensor announced last: counted once the next one starts, or when saving returns

    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr) as bar:
        def callback(tensor, info) -> None:
            bar.update(pending[0])
            pending[0] = tensor.nbytes

        ir.save(model, out, external_data=DATA_FILE, size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES,
                callback=callback, **_writer_options())
        bar.update(pending[0])
    return out
