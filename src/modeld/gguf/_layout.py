"""The tensors an architecture must have, and the shape of each.

llama.cpp refuses a file with a missing or misshapen tensor (cleanly), but only once it
has opened and mapped it; checked here, such a file is ``model_invalid`` before llama.cpp
sees it. The rules follow ``load_arch_tensors`` in llama.cpp's ``src/models/<arch>.cpp``
(the copy llama-cpp-python 0.3.36 vendors) for the architectures modeld is tested with;
a file of any other architecture gets the structural checks, the probe load and
llama.cpp's own checks. Tensors the rules do not name are left alone (llama.cpp counts
them and refuses extras itself). Shapes are ``ne[0]`` first, as in the file.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from modeld.errors import ModelInvalid
from modeld.gguf._hparams import Hyperparameters
from modeld.gguf._raw import RawTensor

__all__ = ["LAYOUT_ARCHITECTURES", "check_tensor_layout"]


@dataclass(frozen=True, slots=True)
class _Dims:
    """The sizes llama.cpp's ``LLAMA_LOAD_LOCALS`` gives a loader (layer 0's values)."""

    embd: int
    vocab: int
    head_k: int
    head_v: int
    heads: int
    heads_kv: int
    ff: int
    experts: int


class _Need(enum.Enum):
    REQUIRED = "required"
    OPTIONAL = "optional"  # checked only when present
    QKV = "unless fused"  # required unless blk.N.attn_qkv.weight is present


Shape = Callable[[_Dims], tuple[int, ...]]


def _fused_qkv(d: _Dims) -> int:
    return d.head_k * (d.heads + d.heads_kv) + d.head_v * d.heads_kv


_Rules = tuple[tuple[str, Shape, _Need], ...]

_GLOBAL: _Rules = (
    ("token_embd.weight", lambda d: (d.embd, d.vocab), _Need.REQUIRED),
    ("output_norm.weight", lambda d: (d.embd,), _Need.REQUIRED),
    ("output.weight", lambda d: (d.embd, d.vocab), _Need.OPTIONAL),
)
_ATTENTION: _Rules = (
    ("attn_norm.weight", lambda d: (d.embd,), _Need.REQUIRED),
    ("attn_qkv.weight", lambda d: (d.embd, _fused_qkv(d)), _Need.OPTIONAL),
    ("attn_q.weight", lambda d: (d.embd, d.head_k * d.heads), _Need.QKV),
    ("attn_k.weight", lambda d: (d.embd, d.head_k * d.heads_kv), _Need.QKV),
    ("attn_v.weight", lambda d: (d.embd, d.head_v * d.heads_kv), _Need.QKV),
    ("attn_q.bias", lambda d: (d.head_k * d.heads,), _Need.OPTIONAL),
    ("attn_k.bias", lambda d: (d.head_k * d.heads_kv,), _Need.OPTIONAL),
    ("attn_v.bias", lambda d: (d.head_v * d.heads_kv,), _Need.OPTIONAL),
    ("attn_output.weight", lambda d: (d.head_k * d.heads, d.embd), _Need.REQUIRED),
    ("ffn_norm.weight", lambda d: (d.embd,), _Need.REQUIRED),
)
_DENSE_FFN: _Rules = (
    ("ffn_gate.weight", lambda d: (d.embd, d.ff), _Need.REQUIRED),
    ("ffn_up.weight", lambda d: (d.embd, d.ff), _Need.REQUIRED),
    ("ffn_down.weight", lambda d: (d.ff, d.embd), _Need.REQUIRED),
)
_LLAMA_EXTRAS: _Rules = (
    ("attn_output.bias", lambda d: (d.embd,), _Need.OPTIONAL),
    ("ffn_gate.bias", lambda d: (d.ff,), _Need.OPTIONAL),
    ("ffn_up.bias", lambda d: (d.ff,), _Need.OPTIONAL),
    ("ffn_down.bias", lambda d: (d.embd,), _Need.OPTIONAL),
)
_LLAMA_EXPERTS: _Rules = (
    ("attn_output.bias", lambda d: (d.embd,), _Need.OPTIONAL),
    ("ffn_gate_inp.weight", lambda d: (d.embd, d.experts), _Need.REQUIRED),
    ("ffn_gate_exps.weight", lambda d: (d.embd, d.ff, d.experts), _Need.OPTIONAL),
    ("ffn_down_exps.weight", lambda d: (d.ff, d.embd, d.experts), _Need.REQUIRED),
    ("ffn_up_exps.weight", lambda d: (d.embd, d.ff, d.experts), _Need.REQUIRED),
)
_GEMMA3_EXTRAS: _Rules = (
    ("post_attention_norm.weight", lambda d: (d.embd,), _Need.REQUIRED),
    ("attn_k_norm.weight", lambda d: (d.head_k,), _Need.REQUIRED),
    ("attn_q_norm.weight", lambda d: (d.head_k,), _Need.REQUIRED),
    ("post_ffw_norm.weight", lambda d: (d.embd,), _Need.REQUIRED),
)


def _llama_layer(dims: _Dims) -> _Rules:
    if dims.experts:
        return _ATTENTION + _LLAMA_EXPERTS
    return _ATTENTION + _DENSE_FFN + _LLAMA_EXTRAS


def _gemma3_layer(dims: _Dims) -> _Rules:
    return _ATTENTION + _DENSE_FFN + _GEMMA3_EXTRAS


_LAYER_RULES: Mapping[str, Callable[[_Dims], _Rules]] = {
    "llama": _llama_layer,
    "gemma3": _gemma3_layer,
}
LAYOUT_ARCHITECTURES = frozenset(_LAYER_RULES)


def check_tensor_layout(
    hparams: Hyperparameters, tensors: tuple[RawTensor, ...], label: str
) -> None:
    """Raise :class:`ModelInvalid` naming the first missing or misshapen tensor."""
    layer_rules = _LAYER_RULES.get(hparams.architecture)
    if layer_rules is None:
        return
    dims = _Dims(
        embd=hparams.embedding_length,
        vocab=hparams.n_vocab,
        head_k=hparams.key_length,
        head_v=hparams.value_length,
        heads=hparams.head_count_per_layer[0],
        heads_kv=hparams.head_count_kv_per_layer[0],
        ff=hparams.feed_forward_per_layer[0],
        experts=hparams.expert_count,
    )
    shapes = {tensor.name: tensor.shape for tensor in tensors}
    _check(_GLOBAL, "", dims, shapes, label, fused=False)
    rules = layer_rules(dims)
    for layer in range(hparams.block_count):
        prefix = f"blk.{layer}."
        _check(rules, prefix, dims, shapes, label, fused=prefix + "attn_qkv.weight" in shapes)


def _check(
    rules: _Rules,
    prefix: str,
    dims: _Dims,
    shapes: Mapping[str, tuple[int, ...]],
    label: str,
    *,
    fused: bool,
) -> None:
    for suffix, shape_of, need in rules:
        name = prefix + suffix
        shape = shapes.get(name)
        if shape is None:
            if need is _Need.REQUIRED or (need is _Need.QKV and not fused):
                raise ModelInvalid(f"{label}: missing tensor {name!r}")
            continue
        expected = shape_of(dims)
        if shape != expected:
            raise ModelInvalid(
                f"{label}: tensor {name!r} has shape {list(shape)}, expected {list(expected)}"
            )
