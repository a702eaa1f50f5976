"""Stream from two models through the library, without HTTP.

python examples/library_stream.py ~/models/llm model-a.gguf model-b.gguf
"""

from __future__ import annotations

import sys

import anyio

from modeld import InferRequest, ModelManager, Settings


async def main(models_dir: str, model_ids: list[str]) -> None:
    settings = Settings(models_dir=models_dir, n_ctx=1024)
    async with ModelManager(settings) as manager:

        async def ask(model_id: str) -> None:
            request = InferRequest(prompt="Once upon a time", model=model_id, max_tokens=48)
            text, result = await manager.complete(request)
            print(
                f"--- {model_id} ({result.done_reason}, "
                f"{result.metrics.tokens_per_second:.0f} tok/s)\n{text}"
            )

        async with anyio.create_task_group() as tasks:  # different models run in parallel
            for model_id in model_ids:
                tasks.start_soon(ask, model_id)
        print(manager.statistics())


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2:])
