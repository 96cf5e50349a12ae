"""The client distribution stays light, and the generated code matches the proto."""

import os
import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import google.rpc
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_client_distribution_depends_on_grpcio_and_protobufs_only() -> None:
    requirements = [Requirement(r) for r in requires("knn-classifier-client") or []]
    plain = {r.name for r in requirements if r.marker is None}
    # googleapis-common-protos: google.rpc.Status and its details (protobuf code only).
    assert plain == {"grpcio", "protobuf", "googleapis-common-protos"}
    # The command line's progress bars come with the optional [cli] extra only.
    extra = {r.name for r in requirements if r.marker and r.marker.evaluate({"extra": "cli"})}
    assert extra - plain == {"tqdm"}


@pytest.mark.parametrize("name", ["status.proto", "error_details.proto"])
def test_the_vendored_google_rpc_protos_are_the_installed_ones(name: str) -> None:
    """buf and the Node.js test read third_party/; Python code comes from the package."""
    installed = Path(google.rpc.__path__[0]) / name
    vendored = ROOT / "third_party" / "googleapis" / "google" / "rpc" / name
    assert vendored.read_text() == installed.read_text(), f"copy {installed} to {vendored}"


def test_the_api_has_no_unsigned_integers() -> None:
    """Java has no unsigned types and TypeScript maps 64-bit ones to strings or bigint."""
    for proto in (ROOT / "proto").rglob("*.proto"):
        assert not re.search(r"\b(uint32|uint64|fixed32|fixed64)\b", proto.read_text()), proto


def test_client_imports_without_the_server_stack() -> None:
    code = (
        "import sys, knn_classifier.client\n"
        "heavy = {'numpy', 'openai', 'qdrant_client', 'qdrant_edge', 'pydantic'}\n"
        "heavy &= set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "gen_proto.sh")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", script, str(tmp_path)], check=True, env=env)
    generated = tmp_path / "knn_classifier" / "v1"
    committed = ROOT / "client" / "knn_classifier" / "v1"
    names = sorted(p.name for p in generated.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.name != "__pycache__")
    stale = [n for n in names if (generated / n).read_bytes() != (committed / n).read_bytes()]
    assert stale == [], "generated code is stale: run `make proto`"
