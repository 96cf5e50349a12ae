import asyncio
import socket

import numpy as np
import pytest

from knn_classifier.server.cache import CachedEmbeddings, EmbeddingCache
from knn_classifier.server.embedding import EmbeddingClient
from knn_classifier.server.errors import InvalidArgument, StartupError, Unavailable
from knn_classifier.server.settings import EmbeddingSettings
from knn_classifier.server.vectors import truncate, usable_rows

from .fake_embedder import FakeEmbeddingServer, fake_vector


def embedder(base_url: str, **changes: object) -> EmbeddingClient:
    values: dict[str, object] = {
        "base_url": base_url,
        "model": "fake",
        "template": "{text}",
        "retries": 2,
        "startup_timeout_s": 0,
        **changes,
    }
    return EmbeddingClient(EmbeddingSettings(**values))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_truncate_keeps_the_prefix_and_renormalises() -> None:
    rng = np.random.default_rng(0)
    full = rng.standard_normal((3, 10)).astype(np.float32)
    cut = truncate(full, 4)
    assert cut.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cut * np.linalg.norm(full[:, :4], axis=1)[:, None], full[:, :4])


def test_truncate_at_full_width_is_plain_normalisation() -> None:
    full = np.array([[3.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(truncate(full, 2), [[0.6, 0.8]])


async def test_embeds_base64_vectors_in_order(fake_embedder: FakeEmbeddingServer) -> None:
    e = embedder(fake_embedder.base_url)
    vectors = await e.embed(["alpha beta", "gamma"])
    np.testing.assert_allclose(vectors[0], fake_vector("alpha beta", 64))
    np.testing.assert_allclose(vectors[1], fake_vector("gamma", 64))
    await e.close()


async def test_float_list_vectors_are_accepted(fake_embedder: FakeEmbeddingServer) -> None:
    """Servers that ignore encoding_format (older SGLang releases) answer lists of floats."""
    fake_embedder.reset(float_lists=True)
    e = embedder(fake_embedder.base_url)
    vectors = await e.embed(["alpha beta", "gamma"])
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors[0], fake_vector("alpha beta", 64))
    np.testing.assert_allclose(vectors[1], fake_vector("gamma", 64))
    await e.close()


async def test_a_call_that_timed_out_is_not_sent_again(fake_embedder: FakeEmbeddingServer) -> None:
    """A call that timed out still runs on the embedding server: sending it again would queue
    a second copy of the same slow work behind it (a retry storm on a slow CPU model)."""
    gate = fake_embedder.hold()
    e = embedder(fake_embedder.base_url, retries=2, timeout_s=2.0)
    try:
        with pytest.raises(Unavailable, match="did not answer within 2s"):
            await e.embed(["slow"])
        await asyncio.to_thread(fake_embedder.wait_for_held, 1)
        assert fake_embedder.behaviour.held == 1
    finally:
        gate.set()
        await e.close()


async def test_large_batches_are_split_into_calls(fake_embedder: FakeEmbeddingServer) -> None:
    e = embedder(fake_embedder.base_url, max_texts_per_call=4)
    vectors = await e.embed([f"text {i}" for i in range(10)])
    assert vectors.shape == (10, 64)
    assert [len(call) for call in fake_embedder.behaviour.inputs] == [4, 4, 2]
    np.testing.assert_allclose(vectors[9], fake_vector("text 9", 64))
    await e.close()


async def test_probe_learns_the_width(fake_embedder: FakeEmbeddingServer) -> None:
    fake_embedder.reset(width=48)
    e = embedder(fake_embedder.base_url)
    assert await e.probe() == 48
    assert e.fingerprint.width == 48
    await e.close()


async def test_prompt_fills_the_template() -> None:
    e = embedder("http://127.0.0.1:1/v1", template="Instruct: {instruction}\nQuery:{text}")
    assert e.prompt("Sort it", "hello") == "Instruct: Sort it\nQuery:hello"
    await e.close()


async def test_400_is_invalid_argument_with_the_reason(fake_embedder: FakeEmbeddingServer) -> None:
    fake_embedder.reset(max_input_chars=5)
    e = embedder(fake_embedder.base_url)
    with pytest.raises(InvalidArgument, match="longer than the model's context"):
        await e.embed(["far too long"])
    assert fake_embedder.behaviour.calls == 1  # a 400 is not retried
    await e.close()


async def test_503_is_retried_then_succeeds(fake_embedder: FakeEmbeddingServer) -> None:
    fake_embedder.reset(fail_status=503, fail_times=2)
    e = embedder(fake_embedder.base_url, retries=2)
    assert (await e.embed(["x"])).shape == (1, 64)
    assert fake_embedder.behaviour.calls == 3
    await e.close()


async def test_503_beyond_the_retries_is_unavailable(fake_embedder: FakeEmbeddingServer) -> None:
    fake_embedder.reset(fail_status=503, fail_times=10)
    e = embedder(fake_embedder.base_url, retries=1)
    with pytest.raises(Unavailable, match="503"):
        await e.embed(["x"])
    assert fake_embedder.behaviour.calls == 2
    await e.close()


async def test_500_is_unavailable_without_retry(fake_embedder: FakeEmbeddingServer) -> None:
    fake_embedder.reset(fail_status=500, fail_times=10)
    e = embedder(fake_embedder.base_url)
    with pytest.raises(Unavailable, match="500"):
        await e.embed(["x"])
    assert fake_embedder.behaviour.calls == 1
    await e.close()


async def test_unreachable_server_is_unavailable() -> None:
    e = embedder(f"http://127.0.0.1:{free_port()}/v1", retries=0)
    with pytest.raises(Unavailable, match="cannot be reached"):
        await e.embed(["x"])
    await e.close()


async def test_probe_of_an_unreachable_server_refuses_start_up() -> None:
    e = embedder(f"http://127.0.0.1:{free_port()}/v1", retries=0)
    with pytest.raises(StartupError, match="KNN_EMBEDDING__BASE_URL"):
        await e.probe()
    await e.close()


@pytest.mark.parametrize("fault", [{"bad_width": True}, {"nan": True}, {"zero_texts": {"two"}}])
async def test_malformed_vectors_are_unavailable(
    fake_embedder: FakeEmbeddingServer, fault: dict[str, object]
) -> None:
    fake_embedder.reset(**fault)
    e = embedder(fake_embedder.base_url)
    with pytest.raises(Unavailable):
        await e.embed(["one", "two"])
    await e.close()


@pytest.mark.parametrize("fault", [{"nan": True}, {"zero_texts": {"two"}}])
async def test_unusable_vectors_are_not_cached(
    fake_embedder: FakeEmbeddingServer, fault: dict[str, object]
) -> None:
    e = embedder(fake_embedder.base_url)
    cached = CachedEmbeddings(e, EmbeddingCache(None, 100), e.known_fingerprint)
    await e.probe()
    fake_embedder.reset(**fault)
    with pytest.raises(Unavailable, match="all-zero or non-finite"):
        await cached.embed(["one", "two"])
    fake_embedder.reset()  # healed: the texts are embedded again, not served from the cache
    vectors = await cached.embed(["one", "two"])
    assert fake_embedder.behaviour.inputs == [["one", "two"]]
    np.testing.assert_allclose(vectors, [fake_vector("one", 64), fake_vector("two", 64)])
    await e.close()


def test_usable_rows_have_a_finite_non_zero_norm() -> None:
    rows = np.array(
        [[0.6, 0.8], [0.0, 0.0], [np.nan, 1.0], [np.inf, 0.0], [3e38, 3e38], [1e-30, 0.0]],
        dtype=np.float32,
    )
    assert usable_rows(rows).tolist() == [True, False, False, False, False, False]
