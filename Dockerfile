# The knn-classifier service. Built by docker-compose.yml; see the README's production section.
FROM python:3.11-slim

RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /app
COPY pyproject.toml uv.lock ./
COPY client client
COPY server server
RUN uv sync --frozen --no-dev --package knn-classifier-server

ENV PATH="/app/.venv/bin:$PATH" \
    KNN_SERVER__HOST=0.0.0.0 \
    KNN_SERVER__PORT=50051
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
assert g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=3).status == h.HealthCheckResponse.SERVING"
# Graceful shutdown: SIGTERM turns health NOT_SERVING and lets in-flight calls finish.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "knn_classifier.server"]
