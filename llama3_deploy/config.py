"""Typed model and generation configs read from Hugging Face JSON, plus built-in presets.

No torch here: the runtime imports this module too.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import DeployError, UnsupportedModelError
from .fsutil import contained_file

SUPPORTED_ROPE_TYPES = ("llama3",)

# Caps on architecture sizes, refused up front naming the field: a value past one is a typo or a hostile
# file, and would otherwise hang building the weight table or try to allocate exabytes (rotary caches are
# positions x head_dim floats, random weights vocabulary x hidden). Each is far above every Llama 3
# (405B: 126 layers, hidden 16384, intermediate 53248, 128 heads; vocabulary 128256; context 131072).
MAX_LAYERS = 1024            # num_hidden_layers: 8x the 405B's 126; the weight table holds 9 entries a layer
MAX_WIDTH = 2 ** 17          # hidden_size and intermediate_size: 131072, 2.5x the 405B's 53248
MAX_HEADS = 1024             # num_attention_heads and num_key_value_heads: 8x the 405B's 128
MAX_HEAD_DIM = 1024          # head_dim: 8x Llama 3's 128
MAX_VOCAB = 2 ** 21          # vocab_size: 2,097,152, 16x Llama 3's 128256
MAX_POSITIONS = 2 ** 21      # max_position_embeddings: 16x Llama 3.1's 131072, 2x the 1M-context fine-tunes;
                             # the optimized graph's fp32 rotary caches at head_dim 128 then take 1 GiB each

# Below these the rotary frequencies overflow to inf (then NaN logits): a RoPE base under 1 inverts the
# frequency ladder, and transformers likewise requires a llama3 scaling factor of at least 1.
ROPE_MINIMUMS = {"rope_theta": 1.0, "factor": 1.0}

INT_CAPS = {"vocab_size": MAX_VOCAB, "hidden_size": MAX_WIDTH, "intermediate_size": MAX_WIDTH,
            "num_hidden_layers": MAX_LAYERS, "num_attention_heads": MAX_HEADS, "num_key_value_heads": MAX_HEADS,
            "head_dim": MAX_HEAD_DIM, "max_position_embeddings": MAX_POSITIONS}


def _show(value: Any) -> str:
    """repr for messages, short even for hostile values (huge ints, deep nesting)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the integer 1


def _int_problem(name: str, value: Any, cap: int) -> str | None:
    if not _is_int(value) or value <= 0:
        return f"{name} must be a positive integer (got {_show(value)})"
    if value > cap:
        return f"{name} {value} exceeds the cap of {cap} (far beyond any Llama 3)"
    return None


def _float_problem(name: str, value: Any, minimum: float = 0.0) -> str | None:
    """Positive finite numbers (> minimum, or >= it when minimum > 0); bools and strings are refused."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            f = float(value)
        except OverflowError:
            ok = False
        else:
            ok = math.isfinite(f) and (f >= minimum if minimum > 0 else f > 0)
    if not ok:
        bound = f">= {minimum:g}" if minimum > 0 else "> 0"
        return f"{name} must be a finite number {bound} (got {_show(value)})"
    return None


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        # The checks transformers' llama3 rope validation makes; past them the inverse frequencies are inf/NaN.
        problems = [p for p in (
            _float_problem("rope_scaling.factor", self.factor, ROPE_MINIMUMS["factor"]),
            _float_problem("rope_scaling.low_freq_factor", self.low_freq_factor),
            _float_problem("rope_scaling.high_freq_factor", self.high_freq_factor),
            _int_problem("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings,
                         MAX_POSITIONS)) if p]
        if not problems and self.high_freq_factor <= self.low_freq_factor:
            problems.append(f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed "
                            f"low_freq_factor ({self.low_freq_factor})")
        if problems:
            raise DeployError("invalid rope_scaling: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture fields the decoder needs; everything else in config.json is ignored or refused."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 128000
    eos_token_ids: tuple[int, ...] = (128009,)
    source_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        # Types and ranges only: token ids are checked against the vocabulary where they are read
        # (from_hf_dict), since a reduced validation config keeps the ids but not the whole vocabulary.
        problems = [p for name, cap in INT_CAPS.items() if (p := _int_problem(name, getattr(self, name), cap))]
        problems += [p for p in (_float_problem("rms_norm_eps", self.rms_norm_eps),
                                 _float_problem("rope_theta", self.rope_theta, ROPE_MINIMUMS["rope_theta"])) if p]
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            problems.append(f"rope_scaling must be a RopeScaling (got {_show(self.rope_scaling)})")
        if not isinstance(self.tie_word_embeddings, bool):
            problems.append(f"tie_word_embeddings must be true or false (got {_show(self.tie_word_embeddings)})")
        if self.bos_token_id is not None and (not _is_int(self.bos_token_id) or self.bos_token_id < 0):
            problems.append(f"bos_token_id must be a non-negative integer or null (got {_show(self.bos_token_id)})")
        if not isinstance(self.eos_token_ids, tuple) or not all(_is_int(i) and i >= 0 for i in self.eos_token_ids):
            problems.append(f"eos_token_ids must be non-negative integers (got {_show(self.eos_token_ids)})")
        if not isinstance(self.source_dtype, str):
            problems.append(f"source_dtype must be a string (got {_show(self.source_dtype)})")
        if not problems:
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                                f"num_key_value_heads ({self.num_key_value_heads})")
            if self.head_dim % 2:
                problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if problems:
            raise DeployError("invalid model config: " + "; ".join(problems))

    @property
    def gqa_ratio(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, i = self.hidden_size, self.intermediate_size
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of key/value cache one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    def with_layers(self, num_hidden_layers: int) -> LlamaConfig:
        """The same architecture at another depth (reduced-depth validation)."""
        return dataclasses.replace(self, num_hidden_layers=num_hidden_layers)

    # --- Hugging Face JSON ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], generation: dict[str, Any] | None = None) -> LlamaConfig:
        """Parse a Hugging Face `config.json` dict, refusing what this decoder does not implement and any
        field of the wrong type or out of range (DeployError naming the field)."""
        if not isinstance(d, dict):
            raise DeployError("config.json must hold a JSON object")
        model_type = d.get("model_type")
        if model_type != "llama":
            raise UnsupportedModelError(f"unsupported model_type {_show(model_type)}: only 'llama' "
                                        "(LlamaForCausalLM) is supported")
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        if not isinstance(archs, list) or "LlamaForCausalLM" not in archs:
            raise UnsupportedModelError(f"unsupported architectures {_show(archs)}: only LlamaForCausalLM is "
                                        "supported")
        unsupported = []
        if d.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={_show(d.get('hidden_act'))} (only 'silu')")
        if d.get("attention_bias", False):
            unsupported.append("attention_bias=true")
        if d.get("mlp_bias", False):
            unsupported.append("mlp_bias=true")
        if d.get("pretraining_tp", 1) not in (1, None):
            unsupported.append(f"pretraining_tp={_show(d.get('pretraining_tp'))} (only 1)")
        scaling = None
        rope = d.get("rope_scaling")
        if rope is not None and not isinstance(rope, dict):
            raise DeployError(f"config.json: rope_scaling must be an object or null (got {_show(rope)})")
        if rope is not None:
            rtype = rope.get("rope_type", rope.get("type"))
            if rtype == "default":
                scaling = None
            elif not isinstance(rtype, str) or rtype not in SUPPORTED_ROPE_TYPES:
                unsupported.append(f"rope_scaling type {_show(rtype)} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
            else:
                missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings") if k not in rope]
                if missing:
                    raise DeployError(f"config.json: rope_scaling lacks {', '.join(missing)}")
                problems = [p for p in (_float_problem(f"rope_scaling.{k}", rope[k], ROPE_MINIMUMS.get(k, 0.0))
                                        for k in ("factor", "low_freq_factor", "high_freq_factor")) if p]
                if problems:
                    raise DeployError("config.json: " + "; ".join(problems))
                scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                      float(rope["high_freq_factor"]), rope["original_max_position_embeddings"])
        if unsupported:
            raise UnsupportedModelError("unsupported Llama config: " + "; ".join(unsupported))
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise DeployError(f"config.json is missing required fields: {', '.join(missing)}")
        ints = {k: d[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads")}
        ints["max_position_embeddings"] = d.get("max_position_embeddings", 8192)
        # transformers reads a null num_key_value_heads as "same as the heads", a null head_dim as
        # hidden_size / heads; present values (0 included) must be valid.
        for key in ("num_key_value_heads", "head_dim"):
            if d.get(key) is not None:
                ints[key] = d[key]
        problems = [p for k, v in ints.items() if (p := _int_problem(k, v, INT_CAPS[k]))]
        if problems:
            raise DeployError("config.json: " + "; ".join(problems))
        heads = ints["num_attention_heads"]
        ints.setdefault("num_key_value_heads", heads)
        ints.setdefault("head_dim", ints["hidden_size"] // heads)
        floats = {"rms_norm_eps": d.get("rms_norm_eps", 1e-5), "rope_theta": d.get("rope_theta", 10000.0)}
        problems = [p for k, v in floats.items() if (p := _float_problem(k, v, ROPE_MINIMUMS.get(k, 0.0)))]
        tie = d.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            problems.append(f"tie_word_embeddings must be true or false (got {_show(tie)})")
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        if not isinstance(dtype, str):
            problems.append(f"torch_dtype must be a string (got {_show(dtype)})")
        if problems:
            raise DeployError("config.json: " + "; ".join(problems))
        gen = generation or {}
        vocab = ints["vocab_size"]
        ids = {}
        for key in ("bos_token_id", "eos_token_id"):
            where = "generation_config.json" if key in gen else "config.json"
            value = gen.get(key, d.get(key))
            listed = value if isinstance(value, list) and key == "eos_token_id" else [value]
            if value is not None and not all(_is_int(i) and 0 <= i < vocab for i in listed):
                kind = "an integer or a list of integers" if key == "eos_token_id" else "an integer"
                raise DeployError(f"{where}: {key} must be {kind} within the vocabulary [0, {vocab}) "
                                  f"(got {_show(value)})")
            ids[key] = None if value is None else listed
        return cls(
            **ints, rms_norm_eps=float(floats["rms_norm_eps"]), rope_theta=float(floats["rope_theta"]),
            rope_scaling=scaling, tie_word_embeddings=tie,
            bos_token_id=ids["bos_token_id"][0] if ids["bos_token_id"] else None,
            eos_token_ids=tuple(ids["eos_token_id"] or ()), source_dtype=dtype,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict that transformers' LlamaConfig reads back to this config."""
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
            "attention_dropout": 0.0, "hidden_act": "silu", "mlp_bias": False, "pretraining_tp": 1,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": None, "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "torch_dtype": self.source_dtype, "use_cache": True, "initializer_range": 0.02,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return d

    def generation_dict(self) -> dict[str, Any]:
        """A `generation_config.json` dict carrying the BOS and every EOS id."""
        return {"bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids)}


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    """Read a JSON object, naming the file in any error (missing, not a file, unreadable, not UTF-8,
    malformed, nested too deep, a number too long to parse)."""
    path = Path(path)
    if not path.exists():
        raise DeployError(f"{what} not found: {path}")
    if not path.is_file():
        raise DeployError(f"{what} is not a regular file: {path}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DeployError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DeployError(f"{what} is not valid UTF-8: {path} ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise DeployError(f"{what} is not valid JSON: {path} (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and int() refusing a number of thousands of digits
        raise DeployError(f"{what} is not valid JSON: {path} ({str(e)[:200]})") from None
    if not isinstance(value, dict):
        raise DeployError(f"{what} must hold a JSON object: {path}")
    return value


def load_config(model_dir: Path) -> LlamaConfig:
    """Read `config.json` (and `generation_config.json` when present) from a checkpoint or export directory.

    Both are read through `fsutil.contained_file`: a symlink resolving outside the directory is refused."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DeployError(f"model directory not found: {model_dir}")
    cfg_path = contained_file(model_dir, "config.json", what="config.json")
    if cfg_path is None:
        raise DeployError(f"config.json not found: {model_dir / 'config.json'}")
    cfg = read_json(cfg_path, what="config.json")
    gen_path = contained_file(model_dir, "generation_config.json", what="generation_config.json")
    gen = read_json(gen_path, what="generation_config.json") if gen_path is not None else None
    try:
        return LlamaConfig.from_hf_dict(cfg, gen)
    except DeployError as e:  # name the directory: the message names the field
        raise type(e)(f"{model_dir}: {e}") from None


# --- Presets: the real Meta-Llama-3 architectures (values from their published config.json) -------
_LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, source_dtype="bfloat16")

PRESETS: dict[str, LlamaConfig] = {
    "meta-llama-3-8b-instruct": LlamaConfig(**_LLAMA3_8B, eos_token_ids=(128001, 128009)),
    "meta-llama-3.1-8b-instruct": LlamaConfig(
        **{**_LLAMA3_8B, "max_position_embeddings": 131072},
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), eos_token_ids=(128001, 128008, 128009)),
    "meta-llama-3-70b-instruct": LlamaConfig(
        **{**_LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
           "num_attention_heads": 64}, eos_token_ids=(128001, 128009)),
    # The benchmark issue's standard CPU model: Llama 3 architecture scaled to ~372 M parameters.
    "llama3-cpu-bench": LlamaConfig(
        **{**_LLAMA3_8B, "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 8,
           "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64}, eos_token_ids=(128001, 128009)),
}


def preset(name: str) -> LlamaConfig:
    """A built-in architecture by name, with a clear error listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise DeployError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"

