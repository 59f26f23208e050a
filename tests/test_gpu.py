"""CUDA execution provider: the same tokens as on CPU. Skipped where onnxruntime has no CUDA provider."""
from __future__ import annotations

import onnxruntime as ort
import pytest

from llama3_deploy.runtime.generate import Generator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="needs onnxruntime-gpu and a CUDA device (none on this machine)"),
]


def test_cuda_greedy_equals_cpu(tiny_export):
    prompts = [[5, 9, 33, 100, 7], [44, 21, 9]]
    cpu = Generator(tiny_export).generate(prompts, max_new_tokens=24, ignore_eos=True)
    gpu = Generator(tiny_export, device="cuda:0")
    cuda = gpu.generate(prompts, max_new_tokens=24, ignore_eos=True)
    assert [r.generated_ids for r in cuda] == [r.generated_ids for r in cpu]
    assert all(a.value.device_name() == "cuda" for a, _ in gpu._cache.buffers)  # KV lives on the device


def test_cuda_graph_replay_equals_uncaptured(tiny_checkpoint, tmp_path):
    """Optimized fp16 with in-graph argmax on CUDA: decode steps replayed from a captured CUDA graph give the
    tokens of uncaptured runs, across two generations on the same buffers."""
    from llama3_deploy.export.pipeline import export_model
    out = export_model(str(tiny_checkpoint), tmp_path / "opt16", dtype="float16", flavor="optimized", argmax=True,
                       progress=False).output
    prompts = [[5, 9, 33, 100, 7], [44, 21, 9]]
    plain = Generator(out, device="cuda:0").generate(prompts, max_new_tokens=24, ignore_eos=True)
    graphed = Generator(out, device="cuda:0", cuda_graph=True)
    for _ in range(2):  # the second generation replays the graph captured in the first
        got = graphed.generate(prompts, max_new_tokens=24, ignore_eos=True)
        assert [r.generated_ids for r in got] == [r.generated_ids for r in plain]
