"""An exported decoder on ONNX Runtime: where it runs (Device), the device memory it reads and writes
(DeviceBuffer), and the loaded, contract-checked graph (DecoderSession).

Nothing here knows about key/value caches or tokens: runtime/kv.py allocates the buffers a graph flavor needs
and binds them for each step; runtime/generate.py runs the token loop on top.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from llama3_deploy import contract
from llama3_deploy.contract import DATA_FILE, MODEL_FILE
from llama3_deploy.dtypes import FROM_ORT, binding_dtype
from llama3_deploy.errors import DeployError
from llama3_deploy.manifest import Manifest, load_manifest

MAX_THREADS = 1024  # ONNX Runtime hangs or crashes creating far more intra-op threads (100000 segfaults)
GRAPH_OPTIMIZATION = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                      "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                      "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                      "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}

@dataclasses.dataclass(frozen=True)
class Device:
    """Where the graph and its buffers live: 'cpu' or 'cuda[:N]'."""

    kind: str = "cpu"
    index: int = 0

    @classmethod
    def parse(cls, spec: str) -> Device:
        if not isinstance(spec, str):
            raise DeployError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:0', not {type(spec).__name__}")
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
        storage, self.element_type = binding_dtype(dtype)
        self.itemsize = storage.itemsize
        if device.kind == "cpu":
            self.host = np.zeros(numel, dtype=storage)  # the same memory ONNX Runtime reads and writes
            self.ptr = self.host.ctypes.data
        else:
            self.host = None
            self.value = ort.OrtValue.ortvalue_from_shape_and_type([numel], self.element_type, "cuda", device.index)
            self.ptr = self.value.data_ptr()

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        """Host view of the first prod(shape) elements (CPU buffers only)."""
        return self.host[: int(np.prod(shape))].reshape(shape)

    def _at(self, offset: int) -> int:
        return self.ptr + offset * self.itemsize

    def bind_input(self, binding: ort.IOBinding, name: str, shape: tuple[int, ...], offset: int = 0) -> None:
        """Bind elements [offset, offset + prod(shape)) as input `name`."""
        binding.bind_input(name, self.device.kind, self.device.index, self.element_type, list(shape),
                           self._at(offset))

    def bind_output(self, binding: ort.IOBinding, name: str, shape: tuple[int, ...], offset: int = 0) -> None:
        binding.bind_output(name, self.device.kind, self.device.index, self.element_type, list(shape),
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


class DecoderSession:
    """A decoder graph loaded into ONNX Runtime and checked against its I/O contract.

    `from_dir` opens an export directory with the contract its manifest records (what the Generator uses);
    the constructor takes a graph file and the contract directly, which is how the exporter's validation runs
    a graph before it has a manifest. Either way the graph's inputs and outputs must equal `io`.
    """

    def __init__(self, model_path: str | Path, *, config, dtype: str, io: contract.DecoderIO, flavor: str,
                 logits: str, argmax: bool = False, device: str = "cpu", threads: int = 0,
                 graph_optimization: str = "all", cuda_graph: bool = False, low_memory: bool = False,
                 manifest: Manifest | None = None):
        self.model_path = Path(model_path)
        self.model_dir = self.model_path.parent
        self.config, self.dtype, self.io = config, dtype, io
        self.kv_dtype = io.kv_dtype
        self.flavor, self.logits, self.argmax = flavor, logits, argmax
        self.manifest = manifest
        self.device = Device.parse(device)
        if not isinstance(cuda_graph, bool):
            raise DeployError(f"cuda_graph must be True or False, not {cuda_graph!r}")
        # CUDA graphs need every decode step to bind the same addresses and shapes: only the optimized flavor
        # (fixed in-place KV, full-width lengths mask) with last-position logits has that.
        self.cuda_graph = cuda_graph
        if cuda_graph and (self.device.kind != "cuda" or flavor != "optimized" or logits != "last"):
            raise DeployError("cuda_graph needs device cuda and an optimized export with --logits last")
        if dtype == "bfloat16" and self.device.kind == "cpu":
            raise DeployError(f"{self.model_dir} is a bfloat16 export; ONNX Runtime runs bfloat16 graphs only on "
                              "its CUDA execution provider (use --device cuda, or export with --dtype fp16/fp32)")
        opts = _session_options(threads, graph_optimization, low_memory)
        providers = self.device.providers(cuda_graph=cuda_graph)  # its DeployError (no CUDA) passes through as is
        try:
            self.session = ort.InferenceSession(str(self.model_path), opts, providers=providers)
        except Exception as e:  # ONNX Runtime raises its own types for unreadable or invalid models
            raise DeployError(f"ONNX Runtime cannot load {self.model_path} (corrupt or incomplete "
                              f"export?): {str(e).splitlines()[0][:300]}") from None
        self._check_graph_matches_contract()

    @classmethod
    def from_dir(cls, model_dir: str | Path, **options) -> DecoderSession:
        """An export directory, checked file by file, with the contract from its manifest; `options` are the
        constructor's device, threads, graph_optimization and cuda_graph."""
        if not isinstance(model_dir, (str, os.PathLike)):
            raise DeployError(f"model_dir must be a path, not {type(model_dir).__name__}")
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise DeployError(f"export directory not found: {model_dir}")
        for name in (MODEL_FILE, DATA_FILE, "config.json"):
            if not (model_dir / name).is_file():
                raise DeployError(f"export directory {model_dir} is missing {name}")
        m = load_manifest(model_dir)
        return cls(model_dir / MODEL_FILE, config=m.config, dtype=m.dtype, io=m.io, flavor=m.flavor, logits=m.logits,
                   argmax=m.argmax, manifest=m, **options)

    def _check_graph_matches_contract(self) -> None:
        def describe(values):
            return [(v.name, FROM_ORT.get(v.type, v.type), tuple(v.shape)) for v in values]

        what = "manifest" if self.manifest is not None else "I/O contract"
        got_in, got_out = describe(self.session.get_inputs()), describe(self.session.get_outputs())
        want_in = [(s.name, s.dtype, s.shape) for s in self.io.inputs]
        want_out = [(s.name, s.dtype, s.shape) for s in self.io.outputs]
        if got_in != want_in or got_out != want_out:
            diff = [f"{g} vs {what} {w}" for g, w in zip(got_in + got_out, want_in + want_out) if g != w]
            if len(got_in) + len(got_out) != len(want_in) + len(want_out):
                diff.insert(0, f"graph has {len(got_in)} inputs/{len(got_out)} outputs, {what} "
                               f"{len(want_in)}/{len(want_out)}")
            raise DeployError(f"export {self.model_dir}: graph does not match its {what}: {'; '.join(diff[:3])}")

    @property
    def io_on_device(self) -> bool:
        """Whether ids, logits, positions and masks must be device buffers: only for CUDA graph replay (ONNX
        Runtime copies host inputs itself otherwise)."""
        return self.cuda_graph

    def new_binding(self) -> ort.IOBinding:
        return self.session.io_binding()

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


def _session_options(threads, graph_optimization, low_memory: bool) -> ort.SessionOptions:
    """threads: 0 (ONNX Runtime's default, one per physical core) or 1..MAX_THREADS; larger values are refused,
    not clamped, so a typo is not silently turned into a different setting."""
    if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= MAX_THREADS:
        raise DeployError(f"threads must be an integer from 0 (ONNX Runtime's default) to {MAX_THREADS}, "
                          f"not {threads!r}")
    if not isinstance(graph_optimization, str) or graph_optimization not in GRAPH_OPTIMIZATION:
        raise DeployError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION)}, "
                          f"not {graph_optimization!r}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = GRAPH_OPTIMIZATION[graph_optimization]
    if low_memory:  # a handful of validation tokens: no arena keeping ORT's fp32 copies of fp16 weights alive
        opts.enable_cpu_mem_arena = False
    return opts
