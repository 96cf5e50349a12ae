"""CPU per embedding call in the service's process, three ways through the openai SDK:
``embeddings.create`` parsed (a pydantic object per vector), ``embeddings.with_raw_response``
decoded straight into numpy, and the SDK's generic ``post`` of the same body decoded the same
way (what ``EmbeddingClient`` does: it also skips ``create``'s request transform).

    python bench/embedding_decode.py                 # 1, 16 and 64 texts, width 1024
    python bench/embedding_decode.py --calls 500 --width 2560

The embedder is ``bench.zero_embedder`` in a subprocess (its CPU is not counted); this process's
CPU time (``time.process_time``) is divided by the number of calls. The two ways alternate in
rounds and the lowest round of each is kept, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import free_port
from knn_classifier.server.embedding import EmbeddingClient
from knn_classifier.server.settings import EmbeddingSettings


async def parsed(client: openai.AsyncOpenAI, texts: list[str]) -> np.ndarray:
    """The SDK's parsed response, each row decoded from base64 (the client before raw decode)."""
    response = await client.embeddings.create(model="zero", input=texts, encoding_format="base64")
    rows = [
        np.frombuffer(base64.b64decode(str(item.embedding)), dtype="<f4") for item in response.data
    ]
    return np.vstack(rows)


async def raw_response(client: openai.AsyncOpenAI, texts: list[str]) -> np.ndarray:
    """``with_raw_response``: no pydantic objects, but ``create``'s request transform still runs."""
    response = await client.embeddings.with_raw_response.create(
        model="zero", input=texts, encoding_format="base64"
    )
    rows = [
        np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        for item in json.loads(response.content)["data"]
    ]
    return np.vstack(rows)


async def cpu_ms_per_call(embed: Callable[[], Awaitable[object]], calls: int) -> float:
    await embed()  # warm: connection open
    start = time.process_time()
    for _ in range(calls):
        await embed()
    return (time.process_time() - start) / calls * 1000


async def measure(base_url: str, args: argparse.Namespace) -> None:
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
    raw = EmbeddingClient(
        EmbeddingSettings(base_url=base_url, model="zero", max_texts_per_call=256)
    )
    print(f"bench/embedding_decode.py --calls {args.calls} --width {args.width}")
    print("| texts per call | create, parsed | with_raw_response | post (the client) | saved |")
    print("|---|---|---|---|---|")
    for size in (1, 16, 64):
        texts = [f"text {i}" for i in range(size)]
        ways = {
            "parsed": functools.partial(parsed, sdk, texts),
            "raw_response": functools.partial(raw_response, sdk, texts),
            "post": functools.partial(raw.embed, texts),
        }
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(args.rounds):
            for name, embed in ways.items():
                best[name] = min(best[name], await cpu_ms_per_call(embed, args.calls))
        saved = 1 - best["post"] / best["parsed"]
        shown = " | ".join(f"{best[name]:.2f} ms" for name in ways)
        print(f"| {size} | {shown} | {saved:.0%} |")
    await sdk.close()
    await raw.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    port = free_port()
    zero = [sys.executable, "-m", "bench.zero_embedder", "--port", str(port)]
    root = Path(__file__).resolve().parents[1]
    embedder = subprocess.Popen([*zero, "--width", str(args.width)], cwd=root)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        asyncio.run(measure(f"http://127.0.0.1:{port}/v1", args))
    finally:
        embedder.terminate()
        embedder.wait()


if __name__ == "__main__":
    main()
