"""Tiny Hugging Face teachers for tests: real model classes, vocab 1024, built from configs in milliseconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
VOCAB_SIZE = 1024


def tiny_config(model_type: str = "llama", **overrides: Any):  # type: ignore[no-untyped-def]
    """A 3-layer, hidden-64, 4-head (2 KV groups) config of a supported family."""
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=model_type in ("qwen2", "qwen3"),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # Random init leaves biases and norm weights at 0/1; perturb them so that surgery bugs cannot hide.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer trained on CPython's pydoc topics (offline, ~1 s)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = list(topics.values())[:40]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def save_tiny_teacher(directory: Path, model_type: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny teacher and its tokenizer as a from_pretrained-able directory."""
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
