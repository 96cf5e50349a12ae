#!/usr/bin/env bash
# Generates the Python code for proto/ into a directory (default: client/), with the tools pinned
# in pyproject.toml (grpcio-tools, mypy-protobuf). `make proto` writes client/;
# `make proto-check` generates into a temporary directory and fails if client/ differs.
set -euo pipefail
out=${1:-client}
python=$(command -v "${PYTHON:-python}")
export PATH="$(dirname "$python"):$PATH"  # the protoc plugins of mypy-protobuf live beside it
cd "$(dirname "$0")/.."
mkdir -p "$out/knn_classifier/v1"
# third_party/googleapis holds google/rpc/*.proto; their Python code comes from the
# googleapis-common-protos distribution, so only our own files are generated.
"$python" -m grpc_tools.protoc -I proto -I third_party/googleapis \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  proto/knn_classifier/v1/*.proto
touch "$out/knn_classifier/v1/py.typed"
