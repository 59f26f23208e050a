"""A TensorRT engine driven by the same token loop as ONNX Runtime: `TensorRTSession` has the attributes and
methods runtime/kv.py and runtime/generate.py use from DecoderSession, and `TensorRTBinding` has IOBinding's
`bind_input`/`bind_output`, so `KVCache.forward/prefill/decode` run unchanged and bind the very same
DeviceBuffers (PingPongKV's past/present pairs, swapped each step).

Libraries: TensorRT's Python package for the engine, and cuda-python (`cuda.bindings.runtime`, `cuda.cudart` in
older releases) for the one stream, its synchronisation and the GPU's name and compute capability. cuda-python
is what TensorRT's own samples use; it is a thin binding of the CUDA runtime with no tensor library, so torch
stays out of the runtime (device memory remains the runtime's DeviceBuffer: ONNX Runtime OrtValues on CUDA).
Both come with `pip install 'llama3-deploy[tensorrt]'` and are imported only when a session is opened.

Profiles and contexts: the engine has a prefill profile (S 1..chunk) and a decode profile (S = 1), and the
session one execution context per profile, each bound to its profile once at creation. Switching one context's
profile per step would invalidate its shapes and cost a stream-ordered switch every step; two contexts keep
their profile, and the decode context runs kernels TensorRT chose for S = 1 (matrix-vector shapes) rather than
the prefill's. A step runs on the decode context when its S is 1 (the portable graph's rows always share the
step) and on the prefill context otherwise. Each context holds its own activation memory; the decode one's is small.

Synchronisation: every run is `execute_async_v3` on the session's one stream followed by a stream synchronise,
so logits read after `run` are complete. ONNX Runtime's uploads into the input buffers (ids, positions, mask) are
synchronous copies on the legacy default stream, with which a stream from cudaStreamCreate synchronises.

The session takes any Device: on 'cpu' the buffers are host memory, which is how the tests drive it with a fake
TensorRT whose contexts read and write those addresses; `Generator(..., backend="tensorrt")` itself needs CUDA.
"""
from __future__ import annotations

import os
from pathlib import Path

from llama3_deploy import contract
from llama3_deploy.engine import DECODE, ENGINE_FILE, PREFILL, read_engine
from llama3_deploy.errors import DeployError
from llama3_deploy.manifest import load_manifest

from .session import Device

EXTRA_HINT = "pip install 'llama3-deploy[tensorrt]'"


def load_libraries():
    """(tensorrt, cudart), or a DeployError naming the extra to install."""
    try:
        import tensorrt as trt
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:  # cuda-python before 12.6 has the runtime bindings here
            from cuda import cudart
    except ImportError as e:
        raise DeployError(f"TensorRT engines need the tensorrt extra (missing: {e.name or e}): {EXTRA_HINT} "
                          "(TensorRT and cuda-python; an NVIDIA GPU and driver)") from None
    return trt, cudart


def cuda_check(cudart, result, what: str):
    """cuda-python returns (error, *values): raise a DeployError naming `what` unless cudaSuccess; the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise DeployError(f"CUDA {what} failed: {name} (is an NVIDIA driver and GPU available?)")
    return values[0] if len(values) == 1 else tuple(values) or None


def gpu_properties(cudart, index: int) -> tuple[str, tuple[int, int]]:
    """(name, (major, minor)) of CUDA device `index`."""
    props = cuda_check(cudart, cudart.cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(name).strip(), (int(props.major), int(props.minor))


class TensorRTBinding:
    """IOBinding's two methods, recorded: name -> (shape, address). `TensorRTSession.run` applies them with
    set_input_shape / set_tensor_address to the context chosen by the step's S, which is known only once the
    ids are bound (and KVCache binds in its own order)."""

    def __init__(self):
        self.inputs: dict[str, tuple[tuple[int, ...], int]] = {}
        self.outputs: dict[str, tuple[tuple[int, ...], int]] = {}

    def bind_input(self, name, device_kind, device_index, element_type, shape, ptr) -> None:
        self.inputs[name] = (tuple(int(d) for d in shape), int(ptr))

    def bind_output(self, name, device_kind, device_index, element_type, shape, ptr) -> None:
        self.outputs[name] = (tuple(int(d) for d in shape), int(ptr))


class TensorRTSession:
    """A verified engine directory loaded into TensorRT, with DecoderSession's interface for KVCache/Generator."""

    cuda_graph = False   # TensorRT has its own launch path; ONNX Runtime's CUDA graphs do not apply
    io_on_device = True  # TensorRT reads and writes every I/O tensor in device memory

    def __init__(self, engine_dir: str | Path, *, device: str | Device = "cuda"):
        if not isinstance(engine_dir, (str, os.PathLike)):
            raise DeployError(f"engine_dir must be a path, not {type(engine_dir).__name__}")
        self.device = device if isinstance(device, Device) else Device.parse(device)
        self.model_dir = Path(engine_dir)
        self.model_path = self.model_dir / ENGINE_FILE
        trt, self._cudart = load_libraries()
        if self.device.kind == "cuda":
            cuda_check(self._cudart, self._cudart.cudaSetDevice(self.device.index), "cudaSetDevice")
        gpu_name, cc = gpu_properties(self._cudart, self.device.index)
        self.engine_manifest, data = read_engine(self.model_dir, trt_version=trt.__version__, gpu_name=gpu_name,
                                                 compute_capability=cc)
        m = load_manifest(self.model_dir)  # the export's manifest, copied beside the engine and checked equal
        self.manifest, self.config, self.dtype, self.io = m, m.config, m.dtype, m.io
        self.flavor, self.logits, self.argmax = m.flavor, m.logits, m.argmax
        self.kv_dtype = m.io.kv_dtype
        limits = self.engine_manifest.limits
        self.max_batch, self.max_context, self.prefill_chunk = (limits.max_batch, limits.max_context,
                                                                limits.prefill_chunk)
        self._profiles = {p.name: p for p in self.engine_manifest.profiles}
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise DeployError(f"TensorRT could not deserialize {self.model_path} (see its messages above)")
        self._check_engine_io(trt)
        self._stream = cuda_check(self._cudart, self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = int(self._stream)
        self.contexts = {}
        for index, name in enumerate((PREFILL, DECODE)):  # the build's profile order
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise DeployError(f"TensorRT could not create an execution context for {self.model_path} "
                                  "(out of device memory?)")
            if not ctx.set_optimization_profile_async(index, self.stream_handle):
                raise DeployError(f"{self.model_path}: cannot select optimization profile {index} ({name})")
            self.contexts[name] = ctx
        self.synchronize()
        self.last_context: str | None = None

    def _check_engine_io(self, trt) -> None:
        """The engine's tensors must be the contract's, inputs as inputs and outputs as outputs."""
        got = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            got[name] = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        want = {**{s.name: True for s in self.io.inputs}, **{s.name: False for s in self.io.outputs}}
        if got != want:
            diff = sorted(set(got.items()) ^ set(want.items()))[:4]
            raise DeployError(f"{self.model_path}: the engine's tensors do not match the export's I/O contract "
                              f"(differing: {diff})")

    def new_binding(self) -> TensorRTBinding:
        return TensorRTBinding()

    def run(self, binding: TensorRTBinding, *, graph_id: int | None = None) -> None:
        """Run one step on the bound buffers; returns when the outputs are complete. `graph_id` is ignored."""
        S = binding.inputs[contract.INPUT_IDS][0][1]
        name = DECODE if S == 1 else PREFILL
        ctx, profile = self.contexts[name], self._profiles[name]
        for tensor, (shape, ptr) in binding.inputs.items():
            if not ctx.set_input_shape(tensor, shape):
                lo, _, hi = profile.shapes.get(tensor, ((), (), ()))
                raise DeployError(f"{tensor} shape {list(shape)} is outside the engine's {name} profile "
                                  f"({list(lo)} .. {list(hi)}); rebuild with larger build-engine limits")
            self._address(ctx, tensor, ptr)
        for tensor, (_, ptr) in binding.outputs.items():
            self._address(ctx, tensor, ptr)
        if not ctx.execute_async_v3(self.stream_handle):
            raise DeployError(f"TensorRT failed to run {self.model_path} (see its messages above)")
        self.synchronize()
        self.last_context = name

    def _address(self, ctx, tensor: str, ptr: int) -> None:
        if not ctx.set_tensor_address(tensor, ptr):
            raise DeployError(f"TensorRT refused the address of {tensor} (not an I/O tensor of the engine?)")

    def synchronize(self) -> None:
        cuda_check(self._cudart, self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Release the contexts and the engine, and destroy the stream; the session cannot run afterwards."""
        if getattr(self, "_stream", None) is not None:
            self.contexts, self.engine = {}, None
            cuda_check(self._cudart, self._cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None
