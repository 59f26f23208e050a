"""Hostile input to the Python API: every bad argument is a DeployError naming the problem, never a TypeError,
a numpy traceback, a segfault or a hang."""
from __future__ import annotations

import json
import shutil

import onnxruntime as ort
import pytest

from llama3_deploy.errors import DeployError
from llama3_deploy.runtime.generate import Generator
from llama3_deploy.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def gen(tiny_export):
    return Generator(tiny_export)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_without_the_cuda_provider_says_so(tiny_export):
    with pytest.raises(DeployError, match="no CUDAExecutionProvider") as e:
        Generator(tiny_export, device="cuda")
    assert "corrupt" not in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(device=None), "device must be a string"),
    (dict(device=0), "device must be a string"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(threads=-1), "threads must be"),
    (dict(threads=2.5), "threads must be"),
    (dict(threads="4"), "threads must be"),
    (dict(threads=True), "threads must be"),
    (dict(threads=100000), "threads must be"),  # ONNX Runtime segfaults on this many
    (dict(prefill_chunk="5"), "prefill_chunk must be a positive integer"),
    (dict(prefill_chunk=True), "prefill_chunk must be a positive integer"),
    (dict(prefill_chunk=0), "prefill_chunk must be a positive integer"),
    (dict(graph_optimization=None), "graph_optimization must be one of"),
    (dict(graph_optimization=["all"]), "graph_optimization must be one of"),
    (dict(cuda_graph="yes"), "cuda_graph must be True or False"),
])
def test_bad_generator_options(tiny_export, kwargs, message):
    with pytest.raises(DeployError, match=message):
        Generator(tiny_export, **kwargs)


def test_threads_within_the_cap_load(tiny_export):
    assert Generator(tiny_export, threads=1).generate([5, 9], max_new_tokens=2).generated_ids


def test_unallocatable_context_is_refused_before_allocating(tiny_export, tmp_path):
    d = tmp_path / "huge-context"
    shutil.copytree(tiny_export, d)
    m = json.loads((d / "manifest.json").read_text())
    m["config"]["max_position_embeddings"] = 2 ** 21  # the config's cap: 2 GiB of KV per row here
    (d / "manifest.json").write_text(json.dumps(m))
    gen = Generator(d)
    with pytest.raises(DeployError, match=r"needs .* bytes") as e:  # 8 TiB: more than any test machine has
        gen.generate([[5, 9]] * 4096, max_new_tokens=2 ** 21 - 2)
    assert "KV cache" in str(e.value)
    assert gen.generate([5, 9], max_new_tokens=3).generated_ids  # still usable afterwards


@pytest.mark.parametrize("prompt, message", [
    (None, "a prompt is text, a list of token ids or a list of chat messages"),
    (123, "a prompt is text, a list of token ids or a list of chat messages"),
    (1.5, "a prompt is text, a list of token ids or a list of chat messages"),
    ([1, [2]], "got a list mixing int, list"),
    ([1.0], "token ids must be integers"),
    ([1, 2.0], "token ids must be integers"),
    ([True, 2], "token ids must be integers"),
    (b"hello", "bytes"),
    ([b"hello"], "bytes"),
    ({"role": "user", "content": "hi"}, "pass a list of messages"),
])
def test_bad_prompts_are_named(gen, prompt, message):
    with pytest.raises(DeployError, match=message):
        gen.generate(prompt, max_new_tokens=2)
    with pytest.raises(DeployError, match=message):
        list(gen.stream(prompt, max_new_tokens=2))
    with pytest.raises(DeployError, match=message):
        gen.prompt_logits(prompt)


@pytest.mark.parametrize("batch, message", [
    ([[1, 2], None], "prompt 1: a prompt is text"),
    ([[1, 2], []], "prompt 1: empty prompt"),
    ([[]], "prompt 0: empty prompt"),
    ([[1, 2], [3, 4.5]], "prompt 1: token ids must be integers"),
])
def test_bad_batches_name_the_prompt(gen, batch, message):
    with pytest.raises(DeployError, match=message):
        gen.generate(batch, max_new_tokens=2)
    with pytest.raises(DeployError, match="stream takes one prompt"):
        list(gen.stream([[1, 2], [3]], max_new_tokens=2))


def test_bad_sampling_arguments(gen):
    with pytest.raises(DeployError, match="unknown sampling parameter 'max_new_token'.*did you mean 'max_new_tokens'"):
        gen.generate([1, 2], max_new_token=3)
    with pytest.raises(DeployError, match="unknown sampling parameter"):
        list(gen.stream([1, 2], temprature=0.5))
    with pytest.raises(DeployError, match="either a SamplingParams or keyword arguments, not both"):
        gen.generate([1, 2], SamplingParams(max_new_tokens=2), temperature=0.5)
    with pytest.raises(DeployError, match="params must be a SamplingParams"):
        gen.generate([1, 2], {"max_new_tokens": 2})
    assert len(gen.generate([1, 2], SamplingParams(max_new_tokens=2, ignore_eos=True)).generated_ids) == 2


def test_chat_template_rendering_nothing_is_an_empty_prompt(tok_export, tmp_path):
    d = tmp_path / "empty-template"
    shutil.copytree(tok_export, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% if false %}never{% endif %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    gen = Generator(d)
    with pytest.raises(DeployError, match="empty prompt"):
        gen.generate([{"role": "user", "content": "hi"}], max_new_tokens=2)
    with pytest.raises(DeployError, match="empty prompt"):
        gen.generate("hi", chat=True, max_new_tokens=2)
