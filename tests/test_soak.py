"""A few seconds of the soak benchmark in the suite: no failures, nothing lost, no orphans."""

from pathlib import Path

from bench.soak import run_soak

from .fake_embedder import FakeEmbeddingServer


def test_short_soak_is_sound(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> None:
    fake_embedder.reset(width=256)
    report = run_soak(6, 32, fake_embedder.base_url, tmp_path)
    assert report.sound, report.table()
    assert report.statuses["OK"] > 50
    assert {"Classify", "ClassifyBatch(16)", "AddExemplars(4)", "CreateClassifier"} <= set(
        report.latencies
    )
    assert report.checked > 1000  # the seed at least, checked in every dimension
    assert report.rss_start_kb > 0
    assert report.rss_end_kb > 0
