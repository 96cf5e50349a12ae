"""A deterministic OpenAI-compatible embedding server for fast tests: real HTTP, SGLang's errors.

A text's vector is the normalised sum of one pseudo-random vector per lower-cased word, so texts
sharing words are similar and the same text always gets the same vector. Tests can make it
answer with an error status, slowly, with malformed vectors, or hold calls until they let them go.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

_WORD = re.compile(r"\w+")


def fake_vector(text: str, width: int) -> np.ndarray:
    total = np.zeros(width, dtype=np.float64)
    for word in _WORD.findall(text.lower()) or [""]:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        total += np.random.default_rng(seed).standard_normal(width)
    return (total / np.linalg.norm(total)).astype(np.float32)


@dataclass
class Behaviour:
    """What the server does next; tests change it between calls."""

    width: int = 64
    max_input_chars: int = 2000
    fail_status: int | None = None
    fail_times: int = 0
    """How many of the next calls fail with fail_status (then it recovers)."""
    failing_texts: set[str] = field(default_factory=set)
    """Calls holding any of these texts fail with fail_status (503 if unset), every time; they are
    counted in calls but not in inputs."""
    bad_width: bool = False
    nan: bool = False
    zero_texts: set[str] = field(default_factory=set)
    """Texts answered with an all-zero vector."""
    malformed: bool = False
    """Answer 200 with a body that is not JSON."""
    float_lists: bool = False
    """Answer vectors as lists of floats, as servers that ignore encoding_format do."""
    delay_s: float = 0.0
    """Wait this long before answering."""
    gate: threading.Event | None = None
    """If set, every call waits for this event before answering (see :meth:`wait_for_held`)."""
    held_texts: set[str] = field(default_factory=set)
    """If any, only calls with a text containing one of these wait at the gate."""
    held: int = 0
    """Calls waiting at the gate now."""
    calls: int = 0
    inputs: list[list[str]] = field(default_factory=list)


class FakeEmbeddingServer:
    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self._lock = threading.Lock()
        self._held_changed = threading.Condition()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._stopped = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FakeEmbeddingServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops listening; kept-alive connections are dropped at their next request."""
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self, **changes: Any) -> Behaviour:
        self.behaviour = Behaviour(**changes)
        return self.behaviour

    def hold(self) -> threading.Event:
        """Makes every call wait until the returned event is set."""
        self.behaviour.gate = threading.Event()
        return self.behaviour.gate

    def wait_for_held(self, calls: int, timeout_s: float = 60.0) -> None:
        """Waits until ``calls`` calls are waiting at the gate."""
        with self._held_changed:
            if not self._held_changed.wait_for(
                lambda: self.behaviour.held >= calls, timeout=timeout_s
            ):
                raise TimeoutError(f"{self.behaviour.held} of {calls} calls arrived")

    def _wait_at_gate(self, behaviour: Behaviour, texts: Any) -> None:
        if behaviour.gate is None:
            return
        if isinstance(texts, str):
            texts = [texts]
        if behaviour.held_texts and not any(
            held in str(text) for held in behaviour.held_texts for text in texts or []
        ):
            return
        with self._held_changed:
            behaviour.held += 1
            self._held_changed.notify_all()
        behaviour.gate.wait(timeout=120)
        with self._held_changed:
            behaviour.held -= 1

    def _respond(self, body: dict[str, Any], b: Behaviour) -> tuple[int, dict[str, Any]]:
        with self._lock:
            b.calls += 1
            if b.fail_times > 0 and b.fail_status is not None:
                b.fail_times -= 1
                return b.fail_status, _sglang_error(b.fail_status, "injected failure")
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return 400, _sglang_error(400, "input must be a non-empty string or list of strings")
        if b.failing_texts.intersection(texts):
            status = b.fail_status or 503
            return status, _sglang_error(status, "injected failure")
        b.inputs.append(texts)
        for text in texts:
            if not text:
                return 400, _sglang_error(400, "input is empty")
            if len(text) > b.max_input_chars:
                return 400, _sglang_error(
                    400,
                    f"The input ({len(text)} tokens) is longer than the model's context length "
                    f"({b.max_input_chars} tokens).",
                )
        data = []
        for i, text in enumerate(texts):
            vector = fake_vector(text, b.width + (i if b.bad_width else 0))
            if text in b.zero_texts:
                vector[:] = 0.0
            if b.nan:
                vector[0] = np.nan
            encoded = base64.b64encode(vector.astype("<f4").tobytes()).decode()
            data.append(
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": vector.tolist() if b.float_lists else encoded,
                }
            )
        tokens = sum(len(t.split()) for t in texts)
        return 200, {
            "object": "list",
            "data": data,
            "model": body.get("model", ""),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, {"status": "ok"} if self.path == "/health" else {})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if server._stopped:
                    self.close_connection = True
                    return
                if self.path != "/v1/embeddings":
                    self._send(404, _sglang_error(404, "not found"))
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, _sglang_error(400, "invalid JSON"))
                    return
                # What the server did when the request arrived: a reset during a slow answer
                # must not make it count against the next test.
                behaviour = server.behaviour
                server._wait_at_gate(behaviour, body.get("input"))
                if behaviour.delay_s:
                    time.sleep(behaviour.delay_s)
                if behaviour.malformed:
                    self._send_raw(200, b"<html>upstream proxy error</html>")
                    return
                self._send(*server._respond(body, behaviour))

            def _send(self, status: int, body: dict[str, Any]) -> None:
                self._send_raw(status, json.dumps(body).encode())

            def _send_raw(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _sglang_error(status: int, message: str) -> dict[str, Any]:
    """SGLang's error body (sglang.srt.entrypoints.openai.protocol.ErrorResponse)."""
    kind = "BadRequestError" if status == 400 else "ServiceUnavailableError"
    return {"object": "error", "message": message, "type": kind, "param": None, "code": status}
