"""Another language calls the real server: Node.js with @grpc/grpc-js and @grpc/proto-loader,
straight from the .proto files, reading the ErrorInfo of a failed call and walking pages."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import ServerThread

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the pinned packages of tests/node installed (`make node-deps`
    installs them too; this lets the test run alone)."""
    binary = shutil.which("node")
    npm = shutil.which("npm")
    assert binary, "Node.js is needed for this test (node >= 18)"
    assert npm, "npm is needed for this test"
    if not (NODE_DIR / "node_modules" / ".installed").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--prefix", str(NODE_DIR)],
            check=True,
            timeout=600,
        )
        (NODE_DIR / "node_modules" / ".installed").touch()
    return binary


def test_a_node_client_speaks_the_api(node: str, server: ServerThread) -> None:
    done = subprocess.run(
        [node, str(NODE_DIR / "interop.mjs"), server.address, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = json.loads(done.stdout)

    assert seen["created"] == {"name": "from_node", "k": 3, "voting": "VOTING_MAJORITY"}
    assert seen["added"] == 5
    assert seen["classified"]["label"] == "card"
    assert seen["batch"] == [{"label": "top_up"}, {"error": "texts[1] is empty"}]
    # 5 exemplars in pages of 2; 2 classifiers in pages of 1.
    assert seen["exemplars"]["pages"] == 3
    assert len(set(seen["exemplars"]["texts"])) == 5
    assert seen["classifiers"] == {"pages": 2, "names": ["from_node", "from_node_2"]}
    assert seen["info"] == {"api_version": "v1", "dimensions": [16, 64], "model": "fake"}

    assert seen["notFound"]["code"] == "NOT_FOUND"
    info, resource = seen["notFound"]["details"]
    assert (info["type"], info["reason"], info["domain"]) == (
        "google.rpc.ErrorInfo",
        "CLASSIFIER_NOT_FOUND",
        "knn_classifier.v1",
    )
    assert (resource["type"], resource["resource_name"]) == (
        "google.rpc.ResourceInfo",
        "no_such_classifier",
    )
    assert seen["badAdd"]["code"] == "INVALID_ARGUMENT"
    info, bad_request = seen["badAdd"]["details"]
    assert info["reason"] == "FIELD_REQUIRED"
    assert [v["field"] for v in bad_request["field_violations"]] == ["exemplars[1].text"]
