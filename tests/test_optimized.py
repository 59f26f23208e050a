"""The optimized flavor (ONNX Runtime contrib ops, in-place KV) against the portable graph and transformers;
weight-only quantized exports; onnxruntime-genai interop; bad options."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llama3_deploy.export.pipeline import export_model
from llama3_deploy.export.quantize import QuantSpec
from llama3_deploy import contract
from llama3_deploy.errors import DeployError
from llama3_deploy.manifest import load_manifest
from llama3_deploy.runtime.generate import Generator
from llama3_deploy.runtime.kv import SharedKV
from llama3_deploy.runtime.session import DeviceBuffer
from tests.conftest import tiny_config, write_random_checkpoint
from tests.test_model import hf_model
from tests.test_runtime import PROMPTS, hf_greedy

N = 24


def _export(ckpt, tmp_path_factory, name, **kwargs):
    return export_model(str(ckpt), tmp_path_factory.mktemp("opt") / name, progress=False, **kwargs).output


@pytest.fixture(scope="module")
def opt_last(tiny_checkpoint, tmp_path_factory):
    return _export(tiny_checkpoint, tmp_path_factory, "last", flavor="optimized")


@pytest.fixture(scope="module")
def opt_all(tiny_checkpoint, tmp_path_factory):
    return _export(tiny_checkpoint, tmp_path_factory, "all", flavor="optimized", logits="all")


def test_manifest_records_flavor_and_genai_config(opt_last):
    m = load_manifest(opt_last)
    assert (m.flavor, m.logits, m.quantization) == ("optimized", "last", None)
    assert m.io.outputs[0].shape == ("batch_size", 1, m.config.vocab_size)
    assert m.io.inputs[2].shape[2] == "max_sequence_length"  # the fixed buffer length, chosen by the runtime
    genai = json.loads((opt_last / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    assert genai["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    steps = m.raw["validation"]["numeric"]["steps"]
    assert all(s["ok"] for s in steps) and max(s["logits_max_abs_diff"] for s in steps) < 1e-5


@pytest.mark.parametrize("which", ["opt_last", "opt_all"])
def test_greedy_matches_portable_and_transformers(which, request, tiny_export, tiny_checkpoint):
    gen = Generator(request.getfixturevalue(which), prefill_chunk=4)  # chunked prefill into the shared buffer
    portable = Generator(tiny_export)
    ref = hf_greedy(tiny_checkpoint, PROMPTS, N)
    batch = gen.generate(PROMPTS, max_new_tokens=N, ignore_eos=True)  # rows of different lengths
    assert [r.generated_ids for r in batch] == ref
    assert [r.generated_ids for r in portable.generate(PROMPTS, max_new_tokens=N, ignore_eos=True)] == ref
    single = gen.generate(PROMPTS[0], max_new_tokens=N, ignore_eos=True)
    assert single.generated_ids == ref[0]
    same_length = [PROMPTS[0], PROMPTS[0][::-1]]  # prefilled together as one batch
    assert [r.generated_ids for r in gen.generate(same_length, max_new_tokens=N, ignore_eos=True)] == \
        [gen.generate(p, max_new_tokens=N, ignore_eos=True).generated_ids for p in same_length]


def test_equal_length_batch_prefills_together(opt_last, monkeypatch):
    gen = Generator(opt_last)
    rows = [PROMPTS[0], PROMPTS[0][::-1], PROMPTS[0][1:] + [3]]
    alone = [gen.generate(p, max_new_tokens=N, ignore_eos=True).generated_ids for p in rows]
    calls = []
    real = SharedKV.forward
    monkeypatch.setattr(SharedKV, "forward", lambda self, ids, row=None, **k: (
        calls.append((ids.shape, row)), real(self, ids, row, **k))[1])
    assert [r.generated_ids for r in gen.generate(rows, max_new_tokens=N, ignore_eos=True)] == alone
    assert calls[0] == ((3, 7), None)  # one prefill run for the three rows


@pytest.fixture(scope="module")
def opt_argmax(tiny_checkpoint, tmp_path_factory):
    return _export(tiny_checkpoint, tmp_path_factory, "argmax", flavor="optimized", argmax=True)


def test_in_graph_argmax_reads_ids_not_logits(opt_argmax, opt_last, tiny_checkpoint, monkeypatch, capsys):
    from llama3_deploy.cli import main
    assert main(["inspect", "--model", str(opt_argmax)]) == 0
    assert "export: optimized graph, float32, logits last, in-graph argmax" in capsys.readouterr().out
    m = load_manifest(opt_argmax)
    assert m.argmax and m.io.has_next_token and not load_manifest(opt_last).io.has_next_token
    assert m.io.outputs[1] == contract.TensorSpec(contract.NEXT_TOKEN, "int64", ("batch_size", 1))
    assert m.io.present_names == load_manifest(opt_last).io.present_names  # the KV contract is unchanged
    assert m.raw["validation"]["numeric"]["next_token"] == "equals argmax(logits) at every step"
    gen, plain = Generator(opt_argmax, prefill_chunk=4), Generator(opt_last)
    same_length = [PROMPTS[0], PROMPTS[0][::-1]]  # one batched prefill run
    expected = [r.generated_ids for r in plain.generate(same_length, max_new_tokens=N, ignore_eos=True)]
    sampled = [dict(temperature=0.8, top_k=20, seed=3), dict(repetition_penalty=1.3)]  # these need logits
    expected_sampled = [plain.generate(PROMPTS[0], max_new_tokens=N, ignore_eos=True, **kw).generated_ids
                        for kw in sampled]
    ref = hf_greedy(tiny_checkpoint, PROMPTS, N)
    downloads = []
    real = DeviceBuffer.download
    monkeypatch.setattr(DeviceBuffer, "download", lambda self: (downloads.append(self.dtype), real(self))[1])
    assert [r.generated_ids for r in gen.generate(PROMPTS, max_new_tokens=N, ignore_eos=True)] == ref
    assert [r.generated_ids for r in gen.generate(same_length, max_new_tokens=N, ignore_eos=True)] == expected
    assert downloads and set(downloads) == {"int64"}  # greedy: only ids were read back, never logits
    for kw, want in zip(sampled, expected_sampled):
        downloads.clear()
        assert gen.generate(PROMPTS[0], max_new_tokens=N, ignore_eos=True, **kw).generated_ids == want
        assert "float32" in downloads


def test_prompt_logits_match_transformers(opt_all, tiny_checkpoint):
    import torch
    ids = PROMPTS[0]
    with torch.no_grad():
        ref = hf_model(tiny_checkpoint)(torch.tensor([ids])).logits[0].numpy()
    got = Generator(opt_all, prefill_chunk=3).prompt_logits(ids)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_shared_buffers_are_reused_in_place(opt_last, monkeypatch):
    gen = Generator(opt_last)
    gen.generate(PROMPTS, max_new_tokens=4, ignore_eos=True)
    cache = gen._cache
    pointers = [b.ptr for b in cache.buffers]
    allocations = []
    original = DeviceBuffer.__init__

    def counting(self, *a, **k):
        allocations.append(a)
        original(self, *a, **k)

    monkeypatch.setattr(DeviceBuffer, "__init__", counting)
    bound = []
    real_bind = type(cache).bind

    def spy(kv, new_tokens, rows):
        real_bind(kv, new_tokens, rows)
        bound.append((rows.start, rows.stop))

    monkeypatch.setattr(type(cache), "bind", spy)
    gen.generate(PROMPTS[::-1], max_new_tokens=6, ignore_eos=True)  # same batch size, another generation
    assert allocations == [] and gen._cache is cache
    assert [b.ptr for b in cache.buffers] == pointers
    # 5 decode steps over all 3 rows, and each prompt prefilled into its own row
    assert bound.count((0, 3)) == 5 and sorted(a for a, b in bound if b - a == 1) == [0, 1, 2]
    assert list(cache.lengths) == [len(p) + 5 for p in PROMPTS[::-1]]


def test_quantized_exports_load_generate_and_stay_close(tiny_checkpoint, opt_all, tmp_path_factory):
    """Logits relative error vs the fp32 graph (random weights: the bound is loose on purpose; quality on a
    trained model is measured by benchmarks/quality.py)."""
    ref = Generator(opt_all).prompt_logits(PROMPTS[0])
    # relative RMS error ||q - fp32|| / ||fp32|| over all positions; measured 0.012 (int8) and 0.11-0.14 (int4)
    bounds = {8: 0.03, 4: 0.25}
    for spec in (QuantSpec(bits=8, symmetric=True), QuantSpec(bits=4), QuantSpec(bits=4, method="hqq"),
                 QuantSpec(bits=4, block_size=16, symmetric=True, accuracy_level=0, embedding=True)):
        out = _export(tiny_checkpoint, tmp_path_factory, spec.label, flavor="optimized", logits="all",
                      quantization=spec)
        m = load_manifest(out)
        assert QuantSpec.from_json(m.quantization) == spec
        gen = Generator(out)
        rel = float(np.linalg.norm(gen.prompt_logits(PROMPTS[0]) - ref) / np.linalg.norm(ref))
        assert rel < bounds[spec.bits], (spec.label, rel)
        assert len(gen.generate(PROMPTS, max_new_tokens=5, ignore_eos=True)[2].generated_ids) == 5


@pytest.mark.parametrize("which", ["opt_last", "opt_argmax"])  # genai leaves the extra next_token output alone
def test_onnxruntime_genai_runs_the_export(which, request):
    og = pytest.importorskip("onnxruntime_genai")
    opt_last = request.getfixturevalue(which)
    prompt = PROMPTS[0]
    model = og.Model(str(opt_last))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + N, min_length=len(prompt) + N, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(np.array([prompt], dtype=np.int32))
    while not g.is_done():
        g.generate_next_token()
    ours = Generator(opt_last).generate(prompt, max_new_tokens=N, ignore_eos=True).generated_ids
    assert g.get_sequence(0)[len(prompt):].tolist() == ours


@pytest.mark.parametrize("kwargs, message", [
    (dict(flavor="fast"), "unknown --flavor 'fast'"),
    (dict(flavor="optimized", logits="some"), "unknown --logits"),
    (dict(quantization=QuantSpec(bits=4)), "use --flavor optimized"),
    (dict(flavor="optimized", quantization=QuantSpec(bits=4, block_size=128)), "does not divide hidden_size 64"),
    (dict(flavor="optimized", quantization=QuantSpec(bits=4, block_size=48)), "power of two"),
    (dict(flavor="optimized", quantization=QuantSpec(bits=3)), "bits 3"),
    (dict(flavor="optimized", dtype="bf16"), "fp32 and fp16"),
    (dict(argmax=True), "or in-graph argmax; use --flavor optimized"),
])
def test_bad_graph_options(tiny_checkpoint, tmp_path, kwargs, message):
    with pytest.raises(DeployError, match=message.replace("(", r"\(")):
        export_model(str(tiny_checkpoint), tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_rejects_unknown_flavor(tiny_checkpoint, tmp_path, capsys):
    from llama3_deploy.cli import main
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--flavor", "fast"])
    assert e.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err
    rc = main(["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--flavor", "optimized",
               "--quantize", "int4", "--block-size", "96", "--quiet"])
    assert rc != 0 and not (tmp_path / "o").exists()
    assert "block size 96" in capsys.readouterr().err


def test_tied_embeddings_and_fp16(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", tiny_config(tie_word_embeddings=True), seed=3)
    for dtype in ("float32", "float16"):
        out = export_model(str(ckpt), tmp_path / dtype, flavor="optimized", dtype=dtype, progress=False).output
        assert load_manifest(out).raw["validation"]["numeric"]["steps"][1]["ok"]


@pytest.mark.parametrize("which", ["opt_last", "opt_argmax"])
def test_cuda_graph_bookkeeping_on_cpu(which, request, monkeypatch):
    """The CUDA-graph path's CPU side: decode steps run under one fixed graph id, prefill runs uncaptured,
    and every decode step binds the same addresses and shapes (what a replayed graph needs)."""
    from llama3_deploy.runtime.session import DecoderSession
    opt_last = request.getfixturevalue(which)
    with pytest.raises(DeployError, match="cuda_graph needs device cuda"):
        Generator(opt_last, cuda_graph=True)
    gen = Generator(opt_last)
    want = [r.generated_ids for r in gen.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]
    gen.session.cuda_graph, gen._cache = True, None  # as on CUDA; ONNX Runtime's CPU EP ignores the graph id
    runs, binds = [], []
    real_run = DecoderSession.run
    real_in, real_out = DeviceBuffer.bind_input, DeviceBuffer.bind_output

    def spy(session, binding, *, graph_id=None):
        runs.append((graph_id, tuple(binds)))
        binds.clear()
        real_run(session, binding, graph_id=graph_id)

    def record(real):
        def bind(buf, binding, name, shape, offset=0):
            binds.append((name, tuple(shape), buf._at(offset)))
            real(buf, binding, name, shape, offset)
        return bind

    monkeypatch.setattr(DecoderSession, "run", spy)
    monkeypatch.setattr(DeviceBuffer, "bind_input", record(real_in))
    monkeypatch.setattr(DeviceBuffer, "bind_output", record(real_out))
    got = [r.generated_ids for r in gen.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]
    assert got == want
    graph_ids = [g for g, _ in runs]
    assert graph_ids[:3] == [None] * 3 and len(runs) == 8  # 3 one-row prefills, 5 decode steps
    assert len(set(graph_ids[3:])) == 1 and graph_ids[3] is not None
    assert len({b for _, b in runs[3:]}) == 1  # every decode step: the same names, shapes and addresses
