"""The ``ollama`` client, unchanged, against ``modeld serve --demo``: the listing, a
streamed chat, structured output with a JSON schema, and embeddings.

    modeld serve --demo &
    python examples/ollama_client.py          # MODELD_URL for another address
"""

from __future__ import annotations

import json
import os

import ollama

client = ollama.Client(host=os.environ.get("MODELD_URL", "http://127.0.0.1:8080"))

for model in client.list().models:
    details = model.details
    assert details is not None
    print(model.model, details.family, details.parameter_size, details.quantization_level)

for part in client.chat(
    model="gemma",
    messages=[{"role": "user", "content": "Name three seas."}],
    options={"num_predict": 48},
    stream=True,
):
    print(part.message.content or "", end="", flush=True)
    if part.done:
        print(f"\n[{part.done_reason}] {part.eval_count} tokens in {part.eval_duration} ns")

sea_schema = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "depth_m": {"type": "integer"}},
    "required": ["name", "depth_m"],
    "additionalProperties": False,
}
answer = client.chat(
    model="gemma",
    messages=[{"role": "user", "content": "Describe one sea as JSON."}],
    format=sea_schema,  # enforced by a grammar while sampling, not merely asked for
    options={"num_predict": 64},
)
print(json.loads(answer.message.content or ""))

vectors = client.embed(model="gemma", input=["The sea.", "The ocean."])
print(len(vectors.embeddings[0]), "dimensions")
