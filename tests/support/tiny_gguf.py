"""Write small random-weight llama-architecture GGUF files that real llama.cpp loads.

Used by modeld's tests and benchmarks (a model in a few milliseconds). Needs ``gguf``
and ``numpy`` (the ``test`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

__all__ = ["TINY_CHAT_TEMPLATE", "TinyModelSpec", "tiny_vocab", "write_tiny_gguf"]

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_TOKEN_TYPE_NORMAL, _TOKEN_TYPE_UNKNOWN, _TOKEN_TYPE_CONTROL, _TOKEN_TYPE_BYTE = 1, 2, 3, 6
# A few whole-word tokens so that text round-trips through more than byte fallback.
_WORDS = ["▁the", "▁a", "▁and", "▁hello", "▁world", "é", "▁日本", "語"]


@dataclass(frozen=True)
class TinyModelSpec:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 128
    context_length: int = 512
    seed: int = 0
    # Zero output rows for <unk>/<s>/</s> make end-of-generation practically never the
    # greedy pick, so tests get full-length generations unless they ask otherwise.
    suppress_eos: bool = True
    # Hostile variants (tests/support/hostile_models.py): another vocabulary (tokens and
    # their types), another tokenizer, a T5 normalisation table, tensors left out or
    # given another (numpy, row-major) shape.
    tokenizer_model: str = "llama"
    vocab: tuple[tuple[str, ...], tuple[int, ...]] | None = None
    precompiled_charsmap: bytes | None = None
    omit_tensors: frozenset[str] = frozenset()
    tensor_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # Written as tokenizer.chat_template when given (a Jinja source, as in real models).
    chat_template: str | None = None


# A ChatML-like template in the tiny vocabulary's terms (its BOS is "<s>"), with the
# checks real templates make: it raises on a role it does not know.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _WORDS
    types = [_TOKEN_TYPE_UNKNOWN, _TOKEN_TYPE_CONTROL, _TOKEN_TYPE_CONTROL]
    types += [_TOKEN_TYPE_BYTE] * 256 + [_TOKEN_TYPE_NORMAL] * len(_WORDS)
    scores = [0.0] * 259 + [-float(i + 1) for i in range(len(_WORDS))]
    return tokens, scores, types


def tiny_vocab() -> tuple[list[str], list[int]]:
    """The tiny models' tokens and token types (to derive hostile variants from)."""
    tokens, _, types = _vocab()
    return tokens, types


def write_tiny_gguf(path: Path | str, spec: TinyModelSpec | None = None) -> Path:
    """Write a loadable model to ``path`` and return it. Deterministic for a given spec."""
    spec = spec or TinyModelSpec()
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    tokens, scores, types = _vocab()
    if spec.vocab is not None:
        tokens, types = list(spec.vocab[0]), list(spec.vocab[1])
        scores = [0.0] * len(tokens)
    n_vocab = len(tokens)
    head_dim = spec.n_embd // spec.n_head

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model(spec.tokenizer_model)
    if spec.precompiled_charsmap is not None:
        writer.add_key_value(
            "tokenizer.ggml.precompiled_charsmap",
            list(spec.precompiled_charsmap),
            gguf.GGUFValueType.ARRAY,
            sub_type=gguf.GGUFValueType.UINT8,
        )
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    if spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)

    output = weights(n_vocab, spec.n_embd)
    if spec.suppress_eos:
        output[[UNK_ID, BOS_ID, EOS_ID]] = 0.0
    reshaped = dict(spec.tensor_shapes)

    def add(name: str, data: np.ndarray) -> None:
        if name in spec.omit_tensors:
            return
        if name in reshaped:
            data = weights(*reshaped[name])
        writer.add_tensor(name, data)

    add("token_embd.weight", weights(n_vocab, spec.n_embd))
    add("output_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
    add("output.weight", output)
    kv_dim = head_dim * spec.n_head_kv
    for layer in range(spec.n_layer):
        prefix = f"blk.{layer}"
        add(f"{prefix}.attn_norm.weight", np.ones(spec.n_embd, np.float32))
        add(f"{prefix}.attn_q.weight", weights(spec.n_embd, spec.n_embd))
        add(f"{prefix}.attn_k.weight", weights(kv_dim, spec.n_embd))
        add(f"{prefix}.attn_v.weight", weights(kv_dim, spec.n_embd))
        add(f"{prefix}.attn_output.weight", weights(spec.n_embd, spec.n_embd))
        add(f"{prefix}.ffn_norm.weight", np.ones(spec.n_embd, np.float32))
        add(f"{prefix}.ffn_gate.weight", weights(spec.n_ff, spec.n_embd))
        add(f"{prefix}.ffn_up.weight", weights(spec.n_ff, spec.n_embd))
        add(f"{prefix}.ffn_down.weight", weights(spec.n_embd, spec.n_ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
