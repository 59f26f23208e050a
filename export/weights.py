"""Checkpoint weights: the one Hugging Face -> decoder name table, strict lazy loading, random weights.

Every source yields Hugging Face-layout tensors one at a time, so export never holds the model in RAM.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from llama3_deploy.config import LlamaConfig, load_config, read_json
from llama3_deploy.dtypes import EXPORT_DTYPES, itemsize
from llama3_deploy.errors import CheckpointError, DeployError
from llama3_deploy.fsutil import contained_file, containment_root

from .model import ROPE_INV_FREQ, rope_inv_freq

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Non-parameter buffers some older checkpoints saved; recomputed from the config, so safe to skip.
IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    """One checkpoint tensor: its Hugging Face name and shape, and the decoder parameter it becomes."""

    source: str                    # Hugging Face name, e.g. model.layers.0.self_attn.q_proj.weight
    target: str                    # decoder parameter name, e.g. layers.0.attn.wq
    source_shape: tuple[int, ...]  # shape in the checkpoint
    transpose: bool                # Linear weights: HF stores [out, in], the decoder [in, out]

    @property
    def target_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.source_shape)) if self.transpose else self.source_shape


def name_table(config: LlamaConfig) -> list[WeightEntry]:
    """The explicit renaming table, in checkpoint order. Shapes come from the config."""
    E, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.q_size, config.kv_size
    t = [WeightEntry("model.embed_tokens.weight", "embed", (V, E), False)]
    for i in range(config.num_hidden_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        t += [
            WeightEntry(hf + "input_layernorm.weight", me + "attn_norm.weight", (E,), False),
            WeightEntry(hf + "self_attn.q_proj.weight", me + "attn.wq", (q, E), True),
            WeightEntry(hf + "self_attn.k_proj.weight", me + "attn.wk", (kv, E), True),
            WeightEntry(hf + "self_attn.v_proj.weight", me + "attn.wv", (kv, E), True),
            WeightEntry(hf + "self_attn.o_proj.weight", me + "attn.wo", (E, q), True),
            WeightEntry(hf + "post_attention_layernorm.weight", me + "mlp_norm.weight", (E,), False),
            WeightEntry(hf + "mlp.gate_proj.weight", me + "mlp.w_gate", (I, E), True),
            WeightEntry(hf + "mlp.up_proj.weight", me + "mlp.w_up", (I, E), True),
            WeightEntry(hf + "mlp.down_proj.weight", me + "mlp.w_down", (E, I), True),
        ]
    t.append(WeightEntry("model.norm.weight", "norm.weight", (E,), False))
    if not config.tie_word_embeddings:
        t.append(WeightEntry("lm_head.weight", "lm_head", (V, E), True))
    return t


def derived_tensors(config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Decoder buffers computed from the config, not read from the checkpoint."""
    return {ROPE_INV_FREQ: rope_inv_freq(config)}


class WeightSource(Protocol):
    """Hugging Face-layout tensors by name, produced one at a time."""

    config: LlamaConfig
    description: str

    def get(self, name: str) -> torch.Tensor: ...
    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...


CONVERT_CHUNK_ROWS = 4096  # source rows read, cast and transposed at once


def _check_finite(entry: WeightEntry, part: torch.Tensor, first_row: int) -> None:
    """A NaN/Inf weight exports fine, may even validate (validation feeds few tokens) and then silently
    breaks generation: refused here, on every chunk every exported weight passes through."""
    finite = torch.isfinite(part)
    if bool(finite.all()):
        return
    bad = (~finite).reshape(part.shape[0], -1).any(dim=1).nonzero()[0, 0].item() if part.dim() > 1 else None
    where = (f", first in row {first_row + bad}" if bad is not None
             else f", first at index {(~finite).nonzero()[0, 0].item()}")
    raise CheckpointError(f"tensor {entry.source} has non-finite values (NaN or Inf){where}; "
                          "the export would produce NaN logits")


def target_tensor(source: WeightSource, entry: WeightEntry, dtype: torch.dtype) -> torch.Tensor:
    """The decoder parameter for one entry: read, checked finite, transposed if needed, cast; contiguous.

    Converted in row chunks into a preallocated result, so only the result and one chunk of the
    source are resident (a 128256 x 4096 head: 1 GiB, not 3).
    """
    if len(entry.source_shape) == 1:
        vector = source.get(entry.source)
        _check_finite(entry, vector, 0)
        return vector.to(dtype).contiguous()
    out = torch.empty(entry.target_shape, dtype=dtype)
    for lo, part in target_chunks(source, entry):
        (out[:, lo:lo + part.shape[1]] if entry.transpose else out[lo:lo + part.shape[0]]).copy_(part)
    return out


def target_chunks(source: WeightSource, entry: WeightEntry, dtype: torch.dtype | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """A matrix entry read CONVERT_CHUNK_ROWS source rows (output channels) at a time, as (first row, part): each
    part laid out as the decoder wants it (target columns [in, r] for a transposed weight, else target rows
    [r, cols]), checked finite, cast to `dtype` when given. Only one part is resident at a time."""
    rows = entry.source_shape[0]
    for lo in range(0, rows, CONVERT_CHUNK_ROWS):
        part = source.get_rows(entry.source, lo, min(lo + CONVERT_CHUNK_ROWS, rows))  # [r, cols]
        _check_finite(entry, part, lo)
        part = part.t() if entry.transpose else part
        yield lo, part if dtype is None else part.to(dtype)


# --- Safetensors checkpoints ------------------------------------------------------------------------
class SafetensorsCheckpoint:
    """A Hugging Face checkpoint directory, opened lazily and checked strictly against the name table.

    Files are opened per tensor and closed again, so no mapping of the whole model stays resident. Every file
    is read through `fsutil.contained_file`: nothing resolving outside the checkpoint (for a hub snapshot,
    outside its `models--ORG--NAME` folder) is read or copied.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.model_dir}")
        self.root = containment_root(self.model_dir)
        self.config = load_config(self.model_dir)
        self.description = str(self.model_dir)
        self.files = self._find_files()
        self.location: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for path in self.files:
            self._read_header(path)
        self.table = name_table(self.config)
        self._check()

    def side_file(self, name: str) -> Path | None:
        """A file beside the weights (config, generation config, tokenizer files) to read or copy: its resolved
        path, None when absent; CheckpointError when it resolves outside the checkpoint or is not a file."""
        return contained_file(self.model_dir, name, what=name, root=self.root)

    def _find_files(self) -> list[Path]:
        d = self.model_dir
        index = self.side_file(INDEX_FILE)
        if index is not None:
            try:
                weight_map = read_json(index, what=INDEX_FILE).get("weight_map")
            except CheckpointError:
                raise
            except DeployError as e:  # the index is part of the checkpoint
                raise CheckpointError(str(e)) from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"malformed {d / INDEX_FILE}: weight_map must map tensor names to file "
                                      "names")
            files = {}  # resolved path -> None: one file named twice is read once
            for name in sorted(set(weight_map.values())):
                path = contained_file(d, name, what=f"shard {name} named by {INDEX_FILE}", root=self.root)
                if path is None:
                    raise CheckpointError(f"{INDEX_FILE} names a shard file that does not exist: {d / name}")
                files[path] = None
            return list(files)
        files = {contained_file(d, p.name, what=p.name, root=self.root): None
                 for p in sorted(d.glob("*.safetensors"))}
        if files:
            return list(files)
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{d} holds only pickle checkpoints ({', '.join(pickles)}); they are never loaded because "
                "unpickling runs arbitrary code. Convert the checkpoint to safetensors first.")
        raise CheckpointError(f"no model.safetensors or *.safetensors files in {d}")

    def _read_header(self, path: Path) -> None:
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in self.location:  # a stray copy must not silently override a tensor
                        raise CheckpointError(f"tensor {key} is in two files, {self.location[key]} and {path}; "
                                              "remove the stray file")
                    sl = f.get_slice(key)
                    self.location[key] = path
                    self.shapes[key] = tuple(sl.get_shape())
                    self.dtypes[key] = sl.get_dtype()
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from None

    def _check(self) -> None:
        expected = {e.source: e for e in self.table}
        missing = [n for n in expected if n not in self.location]
        unexpected = [n for n in self.location if n not in expected and not n.endswith(IGNORABLE_SUFFIXES)]
        wrong = [f"{n}: checkpoint {self.shapes[n]}, config expects {e.source_shape}"
                 for n, e in expected.items() if n in self.shapes and self.shapes[n] != e.source_shape]
        bad_dtype = [f"{n}: {self.dtypes[n]}" for n in expected
                     if n in self.dtypes and self.dtypes[n] not in ("F32", "F16", "BF16")]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:5])}"
                            + (" ..." if len(unexpected) > 5 else ""))
        if wrong:
            problems.append("wrong shape: " + "; ".join(wrong[:5]))
        if bad_dtype:
            problems.append("non-float dtype: " + "; ".join(bad_dtype[:5]))
        if problems:
            raise CheckpointError(f"checkpoint {self.model_dir} does not match its config.json: " + " | ".join(problems))

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        try:
            with safe_open(str(self.location[name]), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.location[name]}: {e}") from None

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(str(self.location[name]), framework="pt") as f:
            return f.get_slice(name)[start:stop]


# --- Seeded random weights ----------------------------------------------------------------------------
class RandomWeights:
    """Seeded random weights in the Hugging Face layout, made on demand: no files needed.

    Values are generated in fixed row blocks seeded by (seed, name, block), so a row slice is
    reproducible without generating the whole tensor. Norm weights are near 1, others N(0, std).
    """

    ROWS_PER_BLOCK = 1024

    def __init__(self, config: LlamaConfig, *, seed: int = 0, dtype: str = "bfloat16", std: float = 0.02,
                 description: str | None = None):
        self.config, self.seed, self.std = config, seed, std
        self.dtype = getattr(torch, dtype)
        self.table = name_table(config)
        self.shapes = {e.source: e.source_shape for e in self.table}
        self.description = description or f"random weights (seed {seed})"

    def _block(self, name: str, block: int, rows: int, cols: int) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}:{name}:{block}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        x = torch.randn(rows, cols, generator=g)
        if name.endswith("norm.weight"):
            return (1.0 + 0.1 * x).to(self.dtype)
        return (x * self.std).to(self.dtype)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        shape = self.shapes[name]
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        if len(shape) == 1:
            return self._block(name, 0, 1, cols)[0][start:stop]
        stop = min(stop, rows)
        bs = self.ROWS_PER_BLOCK
        parts = []
        for b in range(start // bs, (stop - 1) // bs + 1):
            lo, hi = b * bs, min((b + 1) * bs, rows)
            blk = self._block(name, b, hi - lo, cols)
            parts.append(blk[max(start, lo) - lo: min(stop, hi) - lo])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def get(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        return self.get_rows(name, 0, shape[0])


def open_source(spec: str, *, seed: int = 0) -> WeightSource:
    """A checkpoint directory, or `random:PRESET` / `random:CONFIG_DIR` for seeded random weights."""
    if spec.startswith("random:"):
        from llama3_deploy.config import preset
        what = spec[len("random:"):]
        config = load_config(Path(what)) if Path(what).is_dir() else preset(what)
        return RandomWeights(config, seed=seed, dtype=config.source_dtype if config.source_dtype in EXPORT_DTYPES
                             else "bfloat16", description=f"random weights for {what} (seed {seed})")
    if not Path(spec).exists():
        raise DeployError(f"model not found: {spec} (give a checkpoint directory or random:PRESET)")
    return SafetensorsCheckpoint(spec)


def write_checkpoint(source: WeightSource, out_dir: str | os.PathLike, *, shard_bytes: int = 2 << 30,
                     progress: bool = False, overwrite: bool = False) -> Path:
    """Write a source as a Hugging Face safetensors checkpoint (sharded with an index), atomically."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from llama3_deploy.fsutil import atomic_directory

    config = source.config
    table = name_table(config)
    # never overwrite the checkpoint being read (a hub snapshot protects its whole repository folder)
    with atomic_directory(out_dir, overwrite=overwrite, protect=[getattr(source, "model_dir", None)]) as tmp:
        shards: list[list[WeightEntry]] = [[]]
        size = 0
        for e in table:
            n = math.prod(e.source_shape) * itemsize(config.source_dtype if config.source_dtype in EXPORT_DTYPES else "bfloat16")
            if shards[-1] and size + n > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += n
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        if len(shards) == 1:
            names = ["model.safetensors"]
        weight_map = {}
        bar = tqdm(total=len(table), desc="writing checkpoint", unit="tensor", disable=not progress)
        for fname, entries in zip(names, shards):
            tensors = {}
            for e in entries:
                tensors[e.source] = source.get(e.source).contiguous()
                weight_map[e.source] = fname
                bar.update(1)
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        bar.close()
        if len(shards) > 1:
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(config.generation_dict(), indent=2))
    return Path(out_dir)


def load_decoder(source: WeightSource, *, dtype: str = "float32", config: LlamaConfig | None = None):
    """A LlamaDecoder with the source's weights (all layers, or the first `config.num_hidden_layers`)."""
    from .model import LlamaDecoder

    config = config or source.config
    tdtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = LlamaDecoder(config)
    state = {e.target: target_tensor(source, e, tdtype) for e in name_table(config)}
    state.update(derived_tensors(config))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
