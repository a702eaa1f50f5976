"""The ``openai`` client, unchanged, against ``modeld serve --demo``: chat (streamed),
structured output with a Pydantic model, and embeddings.

    modeld serve --demo &
    python examples/openai_client.py          # MODELD_URL for another address
"""

from __future__ import annotations

import os

import pydantic
from openai import OpenAI

base_url = os.environ.get("MODELD_URL", "http://127.0.0.1:8080")
client = OpenAI(base_url=base_url + "/v1", api_key="unused")  # any key, unless one is configured

stream = client.chat.completions.create(
    model="gemma",
    messages=[{"role": "user", "content": "Name three seas."}],
    max_tokens=48,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    else:
        print(f"\n{chunk.usage}")


class Sea(pydantic.BaseModel):
    name: str
    depth_m: int


parsed = client.chat.completions.parse(
    model="gemma",
    messages=[{"role": "user", "content": "Describe one sea as JSON."}],
    response_format=Sea,  # enforced by a grammar while sampling, not merely asked for
    max_tokens=64,
)
print(parsed.choices[0].message.parsed)

vectors = client.embeddings.create(model="gemma", input=["The sea.", "The ocean."])
print(len(vectors.data[0].embedding), "dimensions")
