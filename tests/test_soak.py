"""A few seconds of the soak benchmark in the suite: no errors but intended RESOURCE_EXHAUSTED."""

from pathlib import Path

from bench.soak import run_soak

from .fake_embedder import FakeEmbeddingServer


def test_short_soak_has_no_failures(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> None:
    fake_embedder.reset(width=256)
    report = run_soak(4, 32, fake_embedder.base_url, tmp_path)
    assert report.failures == 0, report.table()
    assert report.statuses["OK"] > 50
    assert set(report.latencies) == {"Classify", "ClassifyBatch(16)", "AddExemplars(4)"}
    assert report.rss_start_kb > 0
    assert report.rss_end_kb > 0
