"""Redis memory per cached embedding, stored as the service stores them (docs/scaling.md).

    python bench/cache_size.py      # part of `make bench`; needs redis-server on the PATH

Starts a private redis-server (no persistence), writes 20,000 vectors per width under the
service's key layout (``knn:embedding:`` + a 32-byte SHA-256 digest, float32 values) with the
service's MSET, and prints Redis's own ``used_memory`` growth per entry beside the raw value
size (the baseline: what the bytes alone would take).
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import redis

ENTRIES = 20_000
WIDTHS = (256, 1024, 2560)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not on the PATH")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        print("\nRedis memory per cached embedding (used_memory growth over 20,000 entries)\n")
        print("| model width | value bytes (baseline) | Redis bytes per entry | per 1M entries |")
        print("|---|---|---|---|")
        for width in WIDTHS:
            client.flushall()
            before = int(client.info("memory")["used_memory"])
            value = np.random.default_rng(width).standard_normal(width).astype("<f4").tobytes()
            for start in range(0, ENTRIES, 1000):
                client.mset(
                    {
                        b"knn:embedding:" + hashlib.sha256(str(i).encode()).digest(): value
                        for i in range(start, start + 1000)
                    }
                )
            per_entry = (int(client.info("memory")["used_memory"]) - before) / ENTRIES
            print(
                f"| {width} | {len(value):,} | {per_entry:,.0f} | "
                f"{per_entry * 1e6 / 2**30:.1f} GiB |"
            )
        client.close()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
