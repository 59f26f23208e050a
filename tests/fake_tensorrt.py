"""A fake `tensorrt` and cuda-python runtime for CPU tests: every call is recorded in `Fake.calls`, and the engines
it "builds" compute: the serialized engine names the source ONNX graph and the profiles, and an execution
context's `execute_async_v3` reads each input from the host address given to `set_tensor_address` with the shape
given to `set_input_shape` (numpy through ctypes), runs the graph in ONNX Runtime, and writes every output to its
address. So the TensorRT session's token loop runs end to end on host DeviceBuffers.

Only the API surface our code uses is faked; it says nothing about what real TensorRT accepts.
"""
from __future__ import annotations

import ctypes
import dataclasses
import enum
import importlib.machinery
import json
import sys
import types

import numpy as np

from llama3_deploy.dtypes import FROM_ORT, binding_dtype


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ErrorCode(enum.IntEnum):
    SUCCESS = 0
    INVALID_NODE = 4
    UNSUPPORTED_NODE = 8


class CudaError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101


@dataclasses.dataclass
class ParserError:
    """TensorRT 10's IParserError; `legacy` ones lack node_name/node_operator, like older bindings."""

    description: str
    node_index: int = -1
    name: str = ""
    operator: str = ""

    def desc(self):
        return self.description

    def node(self):
        return self.node_index

    def node_name(self):
        return self.name

    def node_operator(self):
        return self.operator

    def code(self):
        return ErrorCode.UNSUPPORTED_NODE


@dataclasses.dataclass
class LegacyParserError:
    description: str

    def desc(self):
        return self.description

    def node(self):
        return -1

    def code(self):
        return ErrorCode.INVALID_NODE


class Fake:
    """One fake TensorRT + CUDA installation: its options say how it behaves, `calls` what it was asked."""

    def __init__(self, *, version: str = "10.8.0.43", gpu_name: str = "NVIDIA H100 80GB HBM3",
                 cc: tuple[int, int] = (9, 0), build_fails: bool = False, parse_errors: list | None = None,
                 timing_mismatch: bool = False, cuda_errors: dict | None = None):
        self.version, self.gpu_name, self.cc = version, gpu_name, cc
        self.build_fails, self.parse_errors, self.timing_mismatch = build_fails, parse_errors or [], timing_mismatch
        self.cuda_errors = cuda_errors or {}  # cudart function name -> CudaError it returns
        self.calls: list[tuple] = []
        self.trt = self._trt_module()
        self.cudart = self._cudart_module()

    def record(self, *call) -> None:
        self.calls.append(call)

    def named(self, api: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == api]

    def install(self, monkeypatch) -> Fake:
        cuda = _module("cuda")
        bindings = _module("cuda.bindings")
        cuda.bindings, bindings.runtime = bindings, self.cudart
        for name, mod in (("tensorrt", self.trt), ("cuda", cuda), ("cuda.bindings", bindings),
                          ("cuda.bindings.runtime", self.cudart)):
            monkeypatch.setitem(sys.modules, name, mod)
        return self

    # --- tensorrt --------------------------------------------------------------------------------------
    def _trt_module(self) -> types.ModuleType:
        fake = self
        trt = _module("tensorrt")
        trt.__version__ = self.version
        trt.NetworkDefinitionCreationFlag, trt.MemoryPoolType = NetworkDefinitionCreationFlag, MemoryPoolType
        trt.TensorIOMode, trt.ErrorCode = TensorIOMode, ErrorCode

        class Logger:
            ERROR, WARNING, INFO = 1, 2, 3

            def __init__(self, severity=2):
                self.severity = severity

        class Network:
            def __init__(self, flags):
                self.flags, self.onnx = flags, None

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.errors = network, []

            def parse_from_file(self, path):
                fake.record("parse_from_file", path)
                self.network.onnx = path
                self.errors = list(fake.parse_errors)
                return not self.errors

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                fake.record("set_shape", name, tuple(lo), tuple(opt), tuple(hi))
                self.shapes[name] = (list(lo), list(opt), list(hi))

        class TimingCache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"|timed"

        class BuilderConfig:
            def __init__(self):
                self.profiles, self.cache, self.pools = [], None, {}

            def set_memory_pool_limit(self, pool, size):
                fake.record("set_memory_pool_limit", pool, size)
                self.pools[pool] = size

            def add_optimization_profile(self, profile):
                fake.record("add_optimization_profile", len(self.profiles))
                self.profiles.append(profile.shapes)
                return len(self.profiles) - 1

            def create_timing_cache(self, data):
                fake.record("create_timing_cache", bytes(data))
                return TimingCache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.record("set_timing_cache", ignore_mismatch)
                self.cache = cache
                return not fake.timing_mismatch

            def get_timing_cache(self):
                fake.record("get_timing_cache")
                return self.cache

        class Builder:
            def __init__(self, logger):
                fake.record("Builder")

            def create_network(self, flags):
                fake.record("create_network", flags)
                return Network(flags)

            def create_builder_config(self):
                return BuilderConfig()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.record("build_serialized_network")
                if fake.build_fails:
                    return None
                return json.dumps({"fake_engine": 1, "onnx": network.onnx, "flags": network.flags,
                                   "profiles": config.profiles}).encode()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                fake.record("deserialize_cuda_engine", len(data))
                return Engine(fake, json.loads(bytes(data)))

        trt.Logger, trt.OnnxParser, trt.Builder, trt.Runtime = Logger, OnnxParser, Builder, Runtime
        return trt

    # --- cuda-python ------------------------------------------------------------------------------------
    def _cudart_module(self) -> types.ModuleType:
        fake = self
        rt = _module("cuda.bindings.runtime")
        rt.cudaError_t = CudaError

        def api(name):
            def wrap(fn):
                def call(*args):
                    fake.record(name, *args)
                    err = fake.cuda_errors.get(name)
                    if err is not None:
                        return (err, None)
                    return fn(*args)
                setattr(rt, name, call)
                return call
            return wrap

        class Stream:
            def __int__(self):
                return 0x5EED

        @api("cudaStreamCreate")
        def _create():
            return (CudaError.cudaSuccess, Stream())

        @api("cudaStreamSynchronize")
        def _sync(stream):
            return (CudaError.cudaSuccess,)

        @api("cudaStreamDestroy")
        def _destroy(stream):
            return (CudaError.cudaSuccess,)

        @api("cudaSetDevice")
        def _set_device(index):
            return (CudaError.cudaSuccess,)

        @api("cudaGetDeviceProperties")
        def _props(index):
            name = fake.gpu_name.encode() + b"\0" * 8  # a fixed char[256] in cudaDeviceProp
            return (CudaError.cudaSuccess, types.SimpleNamespace(name=name, major=fake.cc[0], minor=fake.cc[1]))

        return rt


class Engine:
    """Runs the source graph with ONNX Runtime; its tensors are the graph's inputs and outputs."""

    def __init__(self, fake: Fake, blob: dict):
        import onnxruntime as ort
        self.fake, self.blob = fake, blob
        self.session = ort.InferenceSession(blob["onnx"], providers=["CPUExecutionProvider"])
        self.inputs = {v.name: binding_dtype(FROM_ORT[v.type])[0] for v in self.session.get_inputs()}
        self.outputs = [v.name for v in self.session.get_outputs()]
        self.names = [*self.inputs, *self.outputs]
        self.contexts = 0

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def create_execution_context(self):
        self.contexts += 1
        return Context(self, self.contexts - 1)


class Context:
    def __init__(self, engine: Engine, ident: int):
        self.engine, self.id, self.profile = engine, ident, None
        self.shapes, self.addresses = {}, {}

    def set_optimization_profile_async(self, index, stream):
        self.engine.fake.record("set_optimization_profile_async", self.id, index, stream)
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self.engine.fake.record("set_input_shape", self.id, name, tuple(shape))
        lo, _, hi = self.engine.blob["profiles"][self.profile][name]
        if len(shape) != len(lo) or not all(a <= x <= b for a, x, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.engine.fake.record("set_tensor_address", self.id, name, ptr)
        if name not in self.engine.names:
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.engine.fake.record("execute_async_v3", self.id, stream)
        feeds = {}
        for name, dtype in self.engine.inputs.items():
            if name not in self.shapes or name not in self.addresses:
                return False
            shape = self.shapes[name]
            n = int(np.prod(shape)) * dtype.itemsize
            raw = (ctypes.c_char * n).from_address(self.addresses[name]) if n else b""
            feeds[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        outs = self.engine.session.run(self.engine.outputs, feeds)
        for name, value in zip(self.engine.outputs, outs):
            if name not in self.addresses:
                return False
            value = np.ascontiguousarray(value)
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec needs one
    return mod
