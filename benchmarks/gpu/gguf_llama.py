"""Write random-weight llama GGUF files of realistic size (f16), fast.

The tiny test models (``modeld.testing.tiny_gguf``) are a few MB: too small for memory
figures to mean anything on a GPU. These have a real vocabulary size and real layer
shapes, so that llama.cpp's buffers (weights, KV cache, compute) have their real sizes.
Weight values do not matter for memory or speed; they are drawn once into a pool and
tiled (small, like a real initialisation, so activations stay finite in f16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LlamaShape", "write_llama_gguf"]

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6
_POOL_ELEMENTS = (1 << 22) + 7  # not a multiple of any row length: rows do not repeat
_WORDS = ["▁the", "▁a", "▁and", "▁hello", "▁world", "▁sea", "▁light", "▁keeper"]


@dataclass(frozen=True)
class LlamaShape:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int = 32000
    context_length: int = 4096
    seed: int = 0

    @property
    def parameters(self) -> int:
        head_dim = self.n_embd // self.n_head
        kv = head_dim * self.n_head_kv
        per_layer = 2 * self.n_embd * self.n_embd + 2 * kv * self.n_embd
        per_layer += 3 * self.n_ff * self.n_embd + 2 * self.n_embd
        return self.n_layer * per_layer + 2 * self.n_vocab * self.n_embd + self.n_embd


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _WORDS
    if n_vocab < len(tokens):
        raise ValueError(f"n_vocab must be at least {len(tokens)}")
    tokens += [f"▁w{i}" for i in range(n_vocab - len(tokens))]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256
    types += [_NORMAL] * (n_vocab - len(types))
    scores = [0.0] * 259 + [-float(i + 1) for i in range(n_vocab - 259)]
    return tokens, scores, types


def write_llama_gguf(path: Path, shape: LlamaShape) -> Path:
    """Write a loadable f16 llama model to ``path``. Deterministic for a given shape."""
    import gguf

    rng = np.random.default_rng(shape.seed)
    pool = (rng.standard_normal(_POOL_ELEMENTS) * 0.02).astype(np.float16)
    offset = 0

    def weights(rows: int, cols: int) -> np.ndarray:
        nonlocal offset
        offset = (offset + 7919 * rows) % _POOL_ELEMENTS
        flat = np.empty(rows * cols, dtype=np.float16)
        position, start = 0, offset
        while position < flat.size:  # tile the pool (np.resize is ~20x slower)
            count = min(flat.size - position, _POOL_ELEMENTS - start)
            flat[position : position + count] = pool[start : start + count]
            position += count
            start = 0
        return flat.reshape(rows, cols)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    tokens, scores, types = _vocab(shape.n_vocab)
    head_dim = shape.n_embd // shape.n_head
    kv_dim = head_dim * shape.n_head_kv
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)

    output = weights(shape.n_vocab, shape.n_embd).copy()
    output[[UNK_ID, BOS_ID, EOS_ID]] = 0  # end-of-generation practically never greedy
    writer.add_tensor("token_embd.weight", weights(shape.n_vocab, shape.n_embd))
    writer.add_tensor("output_norm.weight", ones(shape.n_embd))
    writer.add_tensor("output.weight", output)
    for layer in range(shape.n_layer):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", ones(shape.n_embd))
        writer.add_tensor(f"{prefix}.attn_q.weight", weights(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"{prefix}.attn_k.weight", weights(kv_dim, shape.n_embd))
        writer.add_tensor(f"{prefix}.attn_v.weight", weights(kv_dim, shape.n_embd))
        writer.add_tensor(f"{prefix}.attn_output.weight", weights(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", ones(shape.n_embd))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weights(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weights(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weights(shape.n_embd, shape.n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
