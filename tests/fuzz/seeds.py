"""Seed inputs for the validator's fuzzer: small valid and nearly valid GGUF files that
reach every part of the parser (keys of each type, string arrays, tensor infos, the
vocabulary checks of SPM, BPE and WPM vocabularies, the llama tensor layout)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support.gguf_bytes import ARR, F32, I32, STR, U32, base_spec, build_gguf


def seeds() -> dict[str, bytes]:
    spm_tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁a"]
    spm_types = [2, 3, 3] + [6] * 256 + [1]

    def spm(spec_tokens: list[str], types: list[int]) -> bytes:
        spec = base_spec(n_layer=1, n_vocab=len(spec_tokens))
        spec.set("tokenizer.ggml.model", STR, "llama")
        spec.set("tokenizer.ggml.tokens", ARR, (STR, spec_tokens))
        spec.set("tokenizer.ggml.scores", ARR, (F32, [0.0] * len(spec_tokens)))
        spec.set("tokenizer.ggml.token_type", ARR, (I32, types))
        return build_gguf(spec)

    aligned_64 = base_spec(n_layer=1).set("general.alignment", U32, 64)
    aligned_64.alignment = 64
    return {
        "base": build_gguf(base_spec(n_layer=1)),
        "base-two-layers": build_gguf(base_spec()),
        "spm-bytes": spm(spm_tokens, spm_types),
        "spm-duplicate": spm([*spm_tokens, "▁a"], [*spm_types, 1]),
        "wpm": build_gguf(base_spec(n_layer=1).set("tokenizer.ggml.model", STR, "bert")),
        "alignment-64": build_gguf(aligned_64),
        "split": build_gguf(base_spec(n_layer=1).set("split.count", U32, 2)),
    }


def write_seeds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in seeds().items():
        path = directory / f"{name}.gguf"
        path.write_bytes(data)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_seeds(Path(sys.argv[1])):
        print(path)
