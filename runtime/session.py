"""An exported decoder on ONNX Runtime: load and check an export, allocate device buffers, bind them.

Buffers are allocated once per (batch, capacity) and reused across steps and generations:
- KV cache: the portable graph reads past [B, K, P, D] and writes a new present [B, K, P+S, D]; both
  are bound as raw pointers into two preallocated device buffers per tensor that swap roles each
  step (ping-pong), so key/values never leave the device and nothing is allocated per step.
- logits: bound into one preallocated buffer sized for a prefill chunk.
- input ids / positions / mask: small host buffers, copied to the device by ONNX Runtime.
- optimized flavor: one fixed buffer per past/present pair [B, K, M, D], bound as both the input and the
  output (GroupQueryAttention writes the new entries in place), plus a [B, M] lengths mask; a single row
  is bound as a one-row view (pointer offset), which is how each prompt is prefilled alone and how
  independent slots of a continuously batched server will share the decode step.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort

from llama3_deploy import contract
from llama3_deploy.contract import DATA_FILE, MODEL_FILE
from llama3_deploy.dtypes import FROM_ORT, numpy_dtype
from llama3_deploy.errors import DeployError
from llama3_deploy.manifest import Manifest, load_manifest



@dataclasses.dataclass(frozen=True)
class Device:
    """Where the graph and its buffers live: 'cpu' or 'cuda[:N]'."""

    kind: str = "cpu"
    index: int = 0

    @classmethod
    def parse(cls, spec: str) -> Device:
        kind, _, idx = spec.partition(":")
        if kind not in ("cpu", "cuda") or (idx and not idx.isdigit()) or (kind == "cpu" and idx):
            raise DeployError(f"unknown device {spec!r}: use cpu, cuda or cuda:N")
        return cls(kind, int(idx or 0))

    def providers(self, *, cuda_graph: bool = False) -> list:
        if self.kind == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DeployError("device cuda requested but this onnxruntime has no CUDAExecutionProvider "
                                  "(install onnxruntime-gpu)")
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN libraries installed from pip are found this way
                ort.preload_dlls()
            options = {"device_id": self.index}
            if cuda_graph:  # decode steps are captured once and replayed (see DecoderSession.run)
                options["enable_cuda_graph"] = "1"
            return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]


class DeviceBuffer:
    """A flat, preallocated buffer on the device; bound to graph inputs/outputs by pointer and shape."""

    def __init__(self, device: Device, dtype: str, numel: int):
        self.device, self.dtype, self.numel = device, dtype, numel
        np_dtype = numpy_dtype(dtype)
        if device.kind == "cpu":
            self.host = np.zeros(numel, dtype=np_dtype)  # the same memory ONNX Runtime reads and writes
            self.ptr = self.host.ctypes.data
        else:
            self.host = None
            self.value = ort.OrtValue.ortvalue_from_shape_and_type([numel], np_dtype, "cuda", device.index)
            self.ptr = self.value.data_ptr()

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        """Host view of the first prod(shape) elements (CPU buffers only)."""
        return self.host[: int(np.prod(shape))].reshape(shape)

    def _at(self, offset: int) -> int:
        return self.ptr + offset * np.dtype(numpy_dtype(self.dtype)).itemsize

    def bind_input(self, binding: ort.IOBinding, name: str, shape: tuple[int, ...], offset: int = 0) -> None:
        """Bind elements [offset, offset + prod(shape)) as input `name`."""
        binding.bind_input(name, self.device.kind, self.device.index, numpy_dtype(self.dtype), list(shape),
                           self._at(offset))

    def bind_output(self, binding: ort.IOBinding, name: str, shape: tuple[int, ...], offset: int = 0) -> None:
        binding.bind_output(name, self.device.kind, self.device.index, numpy_dtype(self.dtype), list(shape),
                            self._at(offset))

    def download(self) -> np.ndarray:
        """The whole buffer as a host array (a copy on CUDA; the buffer itself on CPU)."""
        return self.host if self.host is not None else self.value.numpy()

    def upload(self, host: np.ndarray) -> None:
        """Copy a whole host array of the same size into a device buffer (CUDA; CPU buffers are the host)."""
        if self.host is not None:
            if host is not self.host:
                self.host[...] = host.reshape(-1)
        else:
            self.value.update_inplace(np.ascontiguousarray(host).reshape(-1))


class PingPongKV:
    """KV cache for the portable graph: two device buffers per past/present tensor, swapped each step."""

    def __init__(self, io: contract.DecoderIO, config, dtype: str, device: Device, batch: int, capacity: int):
        self.io, self.batch, self.capacity = io, batch, capacity
        self.kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        numel = batch * self.kv_heads * capacity * self.head_dim
        self.buffers = [(DeviceBuffer(device, dtype, numel), DeviceBuffer(device, dtype, numel))
                        for _ in io.past_names]
        self.length = 0   # tokens currently cached
        self.parity = 0   # which buffer of each pair holds the cache

    def reset(self) -> None:
        self.length, self.parity = 0, 0

    def bind(self, binding: ort.IOBinding, new_tokens: int) -> None:
        if self.length + new_tokens > self.capacity:
            raise DeployError(f"KV cache capacity {self.capacity} exceeded")
        past = (self.batch, self.kv_heads, self.length, self.head_dim)
        present = (self.batch, self.kv_heads, self.length + new_tokens, self.head_dim)
        for (a, b), p_name, o_name in zip(self.buffers, self.io.past_names, self.io.present_names):
            src, dst = (a, b) if self.parity == 0 else (b, a)
            src.bind_input(binding, p_name, past)
            dst.bind_output(binding, o_name, present)

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens
        self.parity ^= 1


class SharedKV:
    """KV cache for the optimized graph: one [B, K, M, D] buffer per past/present pair, written in place.

    Each row (slot) has its own length; the [B, M] mask tells the graph those lengths (row b has
    lengths[b] ones), so a decode step binds the same pointers and shapes every time. Prefill binds one
    row's slice; decode binds all rows. Nothing here grows with the context after allocation.
    """

    def __init__(self, io: contract.DecoderIO, config, dtype: str, device: Device, batch: int, capacity: int):
        self.io, self.batch, self.capacity, self.device = io, batch, capacity, device
        self.kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.row_numel = self.kv_heads * capacity * self.head_dim
        self.buffers = [DeviceBuffer(device, dtype, batch * self.row_numel) for _ in io.past_names]
        self.lengths = np.zeros(batch, np.int64)
        self.mask_host = np.zeros((batch, capacity), np.int64)  # the host copy of the lengths mask
        self._ones = np.ones(batch * capacity, np.int64)  # the mask of a first, batched prefill
        self.mask = DeviceBuffer(device, "int64", batch * capacity) if device.kind != "cpu" else None

    def reset(self) -> None:
        self.lengths[:] = 0
        self.mask_host.fill(0)

    def bind(self, binding: ort.IOBinding, new_tokens: int, row: int | None = None) -> None:
        """Bind all rows (row None: a decode step) or one row's slice, for `new_tokens` more tokens each."""
        rows = slice(0, self.batch) if row is None else slice(row, row + 1)
        lengths = self.lengths[rows]
        if int(lengths.max()) + new_tokens > self.capacity:
            raise DeployError(f"KV cache capacity {self.capacity} exceeded")
        for r, n in zip(range(rows.start, rows.stop), lengths):
            self.mask_host[r, n:n + new_tokens] = 1
        n_rows = rows.stop - rows.start
        # GroupQueryAttention takes several tokens per row for several rows only as a first prompt, i.e. a mask
        # exactly as wide as the new tokens; otherwise the mask spans the whole buffer (static decode shapes).
        first = new_tokens > 1 and n_rows > 1
        if first and lengths.any():
            raise DeployError("a multi-row prefill must start from empty rows; prefill rows one at a time")
        width = new_tokens if first else self.capacity
        host = self._ones[:n_rows * width].reshape(n_rows, width) if first else self.mask_host[rows]
        if self.mask is None:  # CPU: ONNX Runtime reads the host array itself
            binding.bind_input(contract.ATTENTION_MASK, "cpu", 0, np.int64, [n_rows, width], host.ctypes.data)
        else:
            self.mask.upload(self._ones if first else self.mask_host)
            self.mask.bind_input(binding, contract.ATTENTION_MASK, (n_rows, width), 0 if first else rows.start * width)
        shape = (n_rows, self.kv_heads, self.capacity, self.head_dim)
        for buf, p_name, o_name in zip(self.buffers, self.io.past_names, self.io.present_names):
            buf.bind_input(binding, p_name, shape, rows.start * self.row_numel)
            buf.bind_output(binding, o_name, shape, rows.start * self.row_numel)  # same memory: in place

    def advance(self, new_tokens: int, row: int | None = None) -> None:
        if row is None:
            self.lengths += new_tokens
        else:
            self.lengths[row] += new_tokens


class DecoderSession:
    """An export directory loaded into ONNX Runtime, checked against its manifest."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", threads: int = 0,
                 graph_optimization: str = "all", cuda_graph: bool = False):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise DeployError(f"export directory not found: {self.model_dir}")
        for name in (MODEL_FILE, DATA_FILE, "config.json"):
            if not (self.model_dir / name).is_file():
                raise DeployError(f"export directory {self.model_dir} is missing {name}")
        self.manifest: Manifest = load_manifest(self.model_dir)
        self.config, self.dtype, self.io = self.manifest.config, self.manifest.dtype, self.manifest.io
        self.device = Device.parse(device)
        # CUDA graphs need every decode step to bind the same addresses and shapes: only the optimized flavor
        # (fixed in-place KV, full-width lengths mask) with last-position logits has that.
        self.cuda_graph = cuda_graph
        if cuda_graph and (self.device.kind != "cuda" or self.manifest.flavor != "optimized"
                           or self.manifest.logits != "last"):
            raise DeployError("cuda_graph needs device cuda and an optimized export with --logits last")
        if self.dtype == "bfloat16" and self.device.kind == "cpu":
            raise DeployError(f"{self.model_dir} is a bfloat16 export; ONNX Runtime runs bfloat16 graphs only on "
                              "its CUDA execution provider (use --device cuda, or export with --dtype fp16/fp32)")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if graph_optimization not in levels:
            raise DeployError(f"graph_optimization must be one of {', '.join(levels)}")
        opts.graph_optimization_level = levels[graph_optimization]
        try:
            self.session = ort.InferenceSession(str(self.model_dir / MODEL_FILE), opts,
                                                providers=self.device.providers(cuda_graph=cuda_graph))
        except Exception as e:  # ONNX Runtime raises its own types for unreadable or invalid models
            raise DeployError(f"ONNX Runtime cannot load {self.model_dir / MODEL_FILE} (corrupt or incomplete "
                              f"export?): {str(e).splitlines()[0][:300]}") from None
        self._check_graph_matches_manifest()

    def _check_graph_matches_manifest(self) -> None:
        def describe(values):
            return [(v.name, FROM_ORT.get(v.type, v.type), tuple(v.shape)) for v in values]

        got_in, got_out = describe(self.session.get_inputs()), describe(self.session.get_outputs())
        want_in = [(s.name, s.dtype, s.shape) for s in self.io.inputs]
        want_out = [(s.name, s.dtype, s.shape) for s in self.io.outputs]
        if got_in != want_in or got_out != want_out:
            diff = [f"{g} vs manifest {w}" for g, w in zip(got_in + got_out, want_in + want_out) if g != w]
            if len(got_in) + len(got_out) != len(want_in) + len(want_out):
                diff.insert(0, f"graph has {len(got_in)} inputs/{len(got_out)} outputs, manifest "
                               f"{len(want_in)}/{len(want_out)}")
            raise DeployError(f"export {self.model_dir}: graph does not match its manifest: {'; '.join(diff[:3])}")

    def new_binding(self) -> ort.IOBinding:
        return self.session.io_binding()

    def kv_cache(self, batch: int, capacity: int):
        """A KV cache for this graph's flavor, allocated once for `batch` rows of `capacity` tokens."""
        kind = {"portable": PingPongKV, "optimized": SharedKV}[self.manifest.flavor]
        return kind(self.io, self.config, self.dtype, self.device, batch, capacity)

    def run(self, binding: ort.IOBinding, *, graph_id: int | None = None) -> None:
        """Run on the bound buffers. With cuda_graph, `graph_id` names a captured decode graph (captured on its
        first runs, replayed after); None runs without capture (prefill, whose shapes vary)."""
        if self.cuda_graph:
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id) if graph_id is not None else "-1")
            self.session.run_with_iobinding(binding, options)
        else:
            self.session.run_with_iobinding(binding)
        if self.device.kind != "cpu":
            binding.synchronize_outputs()
