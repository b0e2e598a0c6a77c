# The two commands a newcomer needs: `make demo` and `make test`. Both work on a fresh machine.
.PHONY: demo test setup lint unit integration crds bench-store

setup:
	@bash hack/setup.sh

demo: setup
	.venv/bin/kvtier demo

test: setup lint
	.venv/bin/python -m pytest tests

lint:
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .

unit: setup
	.venv/bin/python -m pytest -m unit tests

integration: setup
	.venv/bin/python -m pytest -m integration tests

crds:
	.venv/bin/kvtier crds --write

bench-store: setup
	.venv/bin/kvtier bench store --out docs/benchmarks/store.json
