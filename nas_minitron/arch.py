"""Architectures as plain records: names, exact parameter counts and budgets, from configs alone.

Stdlib only: this module is imported by candidate enumeration for 70B-sized teachers, where building a model
(even on the meta device) is not an option.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from nas_minitron.errors import UserError

__all__ = [
    "ArchConfig",
    "Budget",
    "Invariants",
    "count_params",
    "nearest_loadable_hidden_sizes",
    "prune_problems",
]

_NAME_RE = re.compile(r"^L(\d+)-H(\d+)-I(\d+)-A(\d+)-KV(\d+)$")


@dataclass(frozen=True, order=True)
class ArchConfig:
    """The prunable shape of a decoder-only transformer, with Hugging Face field names.

    `head_dim` is carried explicitly (it is never pruned) because it is not always hidden/heads.
    """

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{field.name} must be a positive integer, but got {field.name}={value!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads must be divisible by num_key_value_heads, but got "
                f"A{self.num_attention_heads} with KV{self.num_key_value_heads} "
                f"(valid KV counts: {_divisors(self.num_attention_heads)})."
            )

    @property
    def name(self) -> str:
        """Short name, e.g. `L32-H3072-I9216-A32-KV8`; `parse` reads it back."""
        return (
            f"L{self.num_hidden_layers}-H{self.hidden_size}-I{self.intermediate_size}"
            f"-A{self.num_attention_heads}-KV{self.num_key_value_heads}"
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def parse(cls, name: str, head_dim: int) -> ArchConfig:
        """Parse a short name; `head_dim` comes from the teacher because the name does not carry it."""
        match = _NAME_RE.match(name.strip())
        if match is None:
            raise UserError(
                f"arch name must look like L32-H3072-I9216-A32-KV8 (layers, hidden, intermediate, heads, KV heads), "
                f"but got {name!r}."
            )
        layers, hidden, inter, heads, kv = (int(g) for g in match.groups())
        return cls(layers, hidden, inter, heads, kv, head_dim)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> ArchConfig:
        return cls(**{f.name: int(data[f.name]) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Invariants:
    """What pruning never changes but the parameter count depends on; read from the teacher's config."""

    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias also biases o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: one RMSNorm(head_dim) for queries and one for keys, shared by heads

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def count_params(arch: ArchConfig, inv: Invariants) -> int:
    """Exact parameter count of a Llama-style decoder (Llama, Mistral, Qwen2, Qwen3) from its shape alone."""
    h, d = arch.hidden_size, arch.head_dim
    q_width = arch.num_attention_heads * d
    kv_width = arch.num_key_value_heads * d
    attn = h * q_width + 2 * h * kv_width + q_width * h
    if inv.qkv_bias:
        attn += q_width + 2 * kv_width
    if inv.o_bias:
        attn += h
    if inv.qk_norm:
        attn += 2 * d
    mlp = 3 * h * arch.intermediate_size
    if inv.mlp_bias:
        mlp += 2 * arch.intermediate_size + h
    norms = 2 * h
    per_layer = attn + mlp + norms
    embeddings = inv.vocab_size * h * (1 if inv.tie_word_embeddings else 2)
    return arch.num_hidden_layers * per_layer + embeddings + h  # + final norm


def prune_problems(target: ArchConfig, teacher: ArchConfig) -> list[str]:
    """Why `target` cannot be pruned out of `teacher` (empty when it can)."""
    problems = []
    axes = [
        ("num_hidden_layers", "L"),
        ("hidden_size", "H"),
        ("intermediate_size", "I"),
        ("num_attention_heads", "A"),
        ("num_key_value_heads", "KV"),
    ]
    for field, tag in axes:
        got, limit = getattr(target, field), getattr(teacher, field)
        if got > limit:
            problems.append(f"{tag}{got} exceeds the teacher's {tag}{limit}")
    if target.head_dim != teacher.head_dim:
        problems.append(f"head_dim {target.head_dim} differs from the teacher's {teacher.head_dim} (never pruned)")
    if target.num_key_value_heads <= teacher.num_key_value_heads and target.heads_per_group > teacher.heads_per_group:
        problems.append(
            f"A{target.num_attention_heads}/KV{target.num_key_value_heads} keeps {target.heads_per_group} query "
            f"heads per KV group but the teacher's groups have only {teacher.heads_per_group}"
        )
    return problems


def nearest_loadable_hidden_sizes(hidden_size: int, num_attention_heads: int) -> tuple[int, int]:
    """The multiples of `num_attention_heads` just below and above `hidden_size` (0 when none below)."""
    below = (hidden_size // num_attention_heads) * num_attention_heads
    above = below + num_attention_heads
    return below, above


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGT]?)\s*$", re.IGNORECASE)
_FRACTION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*[xX]\s*$")


@dataclass(frozen=True)
class Budget:
    """A parameter budget: absolute (`4B`, `4.5e9`, `500M`) or a fraction of the teacher (`0.5x`)."""

    num_params: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        fraction = _FRACTION_RE.match(text)
        if fraction:
            value = float(fraction.group(1))
            if not 0.0 < value < 1.0:
                raise UserError(f"a fractional budget must lie strictly between 0x and 1x, but got {text!r}.")
            return cls(fraction=value)
        match = _BUDGET_RE.match(text)
        if match is None:
            raise UserError(
                f"budget must be a parameter count like 4B, 4.5e9, 500M, 90M or a fraction of the teacher like "
                f"0.5x, but got {text!r}."
            )
        value = float(match.group(1)) * _SUFFIXES[match.group(2).upper()]
        if not math.isfinite(value) or value < 1:
            raise UserError(f"budget must be at least one parameter, but got {text!r}.")
        return cls(num_params=int(round(value)))

    def resolve(self, teacher_params: int) -> int:
        """The budget in parameters for a teacher of `teacher_params` parameters."""
        if self.fraction is not None:
            return int(round(self.fraction * teacher_params))
        assert self.num_params is not None
        return self.num_params

    def __str__(self) -> str:
        return f"{self.fraction}x" if self.fraction is not None else _human(self.num_params or 0)


def _human(num_params: int) -> str:
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if num_params >= scale:
            return f"{num_params / scale:.4g}{suffix}"
    return str(num_params)
