"""Generate small HF-style model directories (for the demo, tests and benchmarks)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

__all__ = ["write_sample_model"]

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tokenizer_json(vocab_size: int, seed: int) -> dict[str, object]:
    """A BPE tokenizer.json the HF ``tokenizers`` crate loads (Dynamo's frontend parses it)."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    while len(vocab) < vocab_size:
        token = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9)))
        vocab.setdefault(token, len(vocab))
    added = [
        {
            "id": i,
            "content": c,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, c in enumerate(("<unk>", "<s>", "</s>"))
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def write_sample_model(
    directory: str | os.PathLike[str],
    *,
    max_position_embeddings: int | None = 4096,
    vocab_size: int = 2000,
    seed: int = 0,
    chat_template: bool = True,
    generation_config: bool = True,
    extra_files: bool = True,
    weights: bool = True,
) -> Path:
    """Write config.json, tokenizer.json, tokenizer_config.json (with a chat template),
    generation_config.json and a couple of extras into ``directory``; returns it.

    ``vocab_size`` scales tokenizer.json (about 14 bytes per entry); ``seed`` varies its bytes.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "vocab_size": vocab_size,
    }
    if max_position_embeddings is not None:
        config["max_position_embeddings"] = max_position_embeddings
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer.json").write_text(json.dumps(_tokenizer_json(vocab_size, seed)))
    tokenizer_config: dict[str, object] = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "LlamaTokenizer",
    }
    if chat_template:
        tokenizer_config["chat_template"] = _CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if generation_config:
        (path / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": 2, "max_length": 2048})
        )
    if extra_files:
        (path / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
        )
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 128)
    return path
