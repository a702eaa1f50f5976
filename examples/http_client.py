"""Read modeld's NDJSON stream with httpx, honouring 429/503 Retry-After.

python examples/http_client.py "The capital of France is"    # MODELD_URL for another address
"""

from __future__ import annotations

import json
import os
import sys
import time

import httpx

BASE_URL = os.environ.get("MODELD_URL", "http://127.0.0.1:8080")


def generate(prompt: str, base_url: str = BASE_URL) -> None:
    body = {"prompt": prompt, "max_tokens": 64}
    with httpx.Client(base_url=base_url, timeout=None) as client:
        for _attempt in range(5):
            with client.stream("POST", "/infer", json=body) as response:
                if response.status_code in (429, 503):
                    time.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                response.raise_for_status()
                for line in response.iter_lines():
                    record = json.loads(line)
                    if record.get("done"):
                        print(f"\n[{record['done_reason']}] {record['metrics']}")
                        return
                    print(record["text"], end="", flush=True)


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else "Hello")
