"""`genai_config.json`: lets onnxruntime-genai run an optimized-flavor export as it is.

The names come from the I/O contract (genai takes "%d" templates); the search defaults are greedy.
"""
from __future__ import annotations

import json
from pathlib import Path

from llama3_deploy import contract
from llama3_deploy.config import LlamaConfig

GENAI_CONFIG_FILE = "genai_config.json"


def genai_config(config: LlamaConfig, *, model_file: str = "model.onnx") -> dict:
    """The config onnxruntime-genai reads for a decoder with a shared past/present buffer."""
    eos = list(config.eos_token_ids)
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {"input_ids": contract.INPUT_IDS, "attention_mask": contract.ATTENTION_MASK,
                           "past_key_names": contract.PAST_KEY_TEMPLATE,
                           "past_value_names": contract.PAST_VALUE_TEMPLATE},
                "outputs": {"logits": contract.LOGITS, "present_key_names": contract.PRESENT_KEY_TEMPLATE,
                            "present_value_names": contract.PRESENT_VALUE_TEMPLATE},
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": eos[0] if eos else 0,
            "type": "llama",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": config.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": True,  # the graph writes past and present in one buffer
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(out_dir: Path, config: LlamaConfig) -> Path:
    path = Path(out_dir) / GENAI_CONFIG_FILE
    path.write_text(json.dumps(genai_config(config), indent=2))
    return path
