"""Typed model and generation configs read from Hugging Face JSON, plus built-in presets.

No torch here: the runtime imports this module too.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import DeployError, UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("llama3",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


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
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer (got {getattr(self, name)!r})")
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
        """Parse a Hugging Face `config.json` dict, refusing what this decoder does not implement."""
        if not isinstance(d, dict):
            raise DeployError("config.json must hold a JSON object")
        model_type = d.get("model_type")
        if model_type != "llama":
            raise UnsupportedModelError(f"unsupported model_type {model_type!r}: only 'llama' (LlamaForCausalLM) is supported")
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        if "LlamaForCausalLM" not in archs:
            raise UnsupportedModelError(f"unsupported architectures {archs}: only LlamaForCausalLM is supported")
        unsupported = []
        if d.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={d.get('hidden_act')!r} (only 'silu')")
        if d.get("attention_bias", False):
            unsupported.append("attention_bias=true")
        if d.get("mlp_bias", False):
            unsupported.append("mlp_bias=true")
        if d.get("pretraining_tp", 1) not in (1, None):
            unsupported.append(f"pretraining_tp={d.get('pretraining_tp')} (only 1)")
        rope = d.get("rope_scaling")
        scaling = None
        if rope is not None:
            rtype = rope.get("rope_type", rope.get("type"))
            if rtype == "default":
                scaling = None
            elif rtype not in SUPPORTED_ROPE_TYPES:
                unsupported.append(f"rope_scaling type {rtype!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
            else:
                try:
                    scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                          float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
                except (KeyError, TypeError, ValueError) as e:
                    raise DeployError(f"malformed rope_scaling in config.json: {rope!r} ({e})") from None
        if unsupported:
            raise UnsupportedModelError("unsupported Llama config: " + "; ".join(unsupported))
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise DeployError(f"config.json is missing required fields: {', '.join(missing)}")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or (d["hidden_size"] // heads if isinstance(heads, int) and heads else 0)
        gen = generation or {}
        eos = gen.get("eos_token_id", d.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads, head_dim=head_dim,
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=scaling, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=gen.get("bos_token_id", d.get("bos_token_id")), eos_token_ids=eos_ids,
            source_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
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
    """Read a JSON object, naming the file in any error."""
    if not path.is_file():
        raise DeployError(f"{what} not found: {path}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeployError(f"{what} is not valid JSON: {path} ({e})") from None
    if not isinstance(value, dict):
        raise DeployError(f"{what} must hold a JSON object: {path}")
    return value


def load_config(model_dir: Path) -> LlamaConfig:
    """Read `config.json` (and `generation_config.json` when present) from a checkpoint or export directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DeployError(f"model directory not found: {model_dir}")
    cfg = read_json(model_dir / "config.json", what="config.json")
    gen_path = model_dir / "generation_config.json"
    gen = read_json(gen_path, what="generation_config.json") if gen_path.exists() else None
    return LlamaConfig.from_hf_dict(cfg, gen)


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

