"""`make bench` in miniature: the benchmark runs end to end and says what it measured."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_throughput_benchmark_runs_and_cache_hits_make_no_call() -> None:
    command = [sys.executable, "bench/throughput.py", "--sizes", "200", "--dimensions", "64"]
    result = subprocess.run(
        [*command, "--seconds", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| 200 |")]
    measures = {row[2]: row for row in rows}
    for measure in (
        "Classify c=1",
        "Classify c=64",
        "ClassifyBatch(128) x4",
        "store query, 128 vectors",
        "AddExemplars (256 per call, 10 at once)",
    ):
        assert measure in measures, result.stdout
    assert measures["embedding calls on cache hits, c=64"][3].startswith("0 calls for ")
    assert "% of echo" in measures["Classify c=64"][5]
