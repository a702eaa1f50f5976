"""A tiny random-weight Gemma 3 GGUF: sliding-window attention in a model that loads in
milliseconds.

Gemma 3 interleaves five sliding-window layers with one full-attention layer; llama.cpp
gives the window layers their own KV cache, which (without ``swa_full``) keeps only the
last ``sliding_window + n_ubatch`` positions (rounded up to 256). Tests use a small window
to reach that pruning with a few hundred tokens.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tests.support.tiny_gguf import BOS_ID, EOS_ID, UNK_ID, _vocab

__all__ = ["write_tiny_gemma3_gguf"]

N_EMBD = 64
N_HEAD = 4
HEAD_DIM = 16
N_FF = 128
N_LAYER = 6  # five window layers, then one full one


def write_tiny_gemma3_gguf(
    path: Path | str, *, sliding_window: int = 16, context_length: int = 2048, seed: int = 0
) -> Path:
    """Write a loadable Gemma 3 model to ``path`` and return it. Deterministic."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    def norm(size: int) -> np.ndarray:
        return np.ones(size, np.float32)  # stored as 1 + w, as the converter writes them

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name(path.stem)
    writer.add_context_length(context_length)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(sliding_window)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)

    writer.add_tensor("token_embd.weight", weights(len(tokens), N_EMBD))
    output = weights(len(tokens), N_EMBD)  # untied, or each token would predict itself
    output[[UNK_ID, BOS_ID, EOS_ID]] = 0.0  # full-length generations, as tiny_gguf's
    writer.add_tensor("output.weight", output)
    writer.add_tensor("output_norm.weight", norm(N_EMBD))
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", norm(N_EMBD))
        writer.add_tensor(f"{prefix}.attn_q.weight", weights(N_HEAD * HEAD_DIM, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_k.weight", weights(N_HEAD * HEAD_DIM, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_v.weight", weights(N_HEAD * HEAD_DIM, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_q_norm.weight", norm(HEAD_DIM))
        writer.add_tensor(f"{prefix}.attn_k_norm.weight", norm(HEAD_DIM))
        writer.add_tensor(f"{prefix}.attn_output.weight", weights(N_EMBD, N_HEAD * HEAD_DIM))
        writer.add_tensor(f"{prefix}.post_attention_norm.weight", norm(N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", norm(N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weights(N_EMBD, N_FF))
        writer.add_tensor(f"{prefix}.post_ffw_norm.weight", norm(N_EMBD))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
