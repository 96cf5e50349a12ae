"""A near-zero-cost OpenAI-compatible embedding server, so a benchmark measures the service.

    python -m bench.zero_embedder --port 8001 --width 1024

Answers ``POST /v1/embeddings`` (base64 float32, as SGLang does) with vectors picked from a
fixed pool by a hash of the text: the same text always gets the same vector, and computing one
costs a dictionary lookup. ``GET /health`` answers 200; ``GET /stats`` returns how many calls
and texts it has embedded, which is how a benchmark counts embedding calls per classified text.
A bare HTTP/1.1 server on asyncio (keep-alive, Content-Length bodies) keeps its own overhead far
below that of http.server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import zlib

import numpy as np

_POOL_SIZE = 4096


class ZeroEmbedder:
    def __init__(self, width: int) -> None:
        rng = np.random.default_rng(0)
        pool = rng.standard_normal((_POOL_SIZE, width)).astype("<f4")
        pool /= np.linalg.norm(pool, axis=1, keepdims=True)
        self._encoded = [base64.b64encode(row.tobytes()).decode() for row in pool]
        self.calls = 0
        self.texts = 0

    def embeddings(self, body: bytes) -> bytes:
        inputs = json.loads(body)["input"]
        texts = [inputs] if isinstance(inputs, str) else inputs
        self.calls += 1
        self.texts += len(texts)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": self._encoded[zlib.crc32(t.encode()) % _POOL_SIZE],
            }
            for i, t in enumerate(texts)
        ]
        usage = {"prompt_tokens": len(texts), "total_tokens": len(texts)}
        answer = {"object": "list", "data": data, "model": "zero", "usage": usage}
        return json.dumps(answer).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = dict(line.split(":", 1) for line in header_lines if ":" in line)
                length = int(
                    next((v for k, v in headers.items() if k.lower() == "content-length"), 0)
                )
                body = await reader.readexactly(length) if length else b""
                if method == "POST" and path.endswith("/embeddings"):
                    payload = self.embeddings(body)
                elif path == "/stats":
                    payload = json.dumps({"calls": self.calls, "texts": self.texts}).encode()
                else:
                    payload = b"{}"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(payload) + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def serve(port: int, width: int) -> None:
    embedder = ZeroEmbedder(width)
    server = await asyncio.start_server(embedder.handle, "127.0.0.1", port, limit=1 << 24)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.width))


if __name__ == "__main__":
    main()
