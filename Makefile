# The two commands a newcomer needs: `make demo` and `make test`. Both work on a fresh machine.
.PHONY: demo test setup lint unit integration crds bench-store test-vllm check-rules

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

# The optional vLLM tier: the connector against vLLM's real base class (downloads vLLM and torch, ~9 GB).
test-vllm: setup
	test -x .venv-vllm/bin/python || python3 -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q vllm pytest pytest-timeout -e .
	.venv-vllm/bin/python -m pytest -m "vllm or torch" tests/vllm tests/torch

# The chart's alert rules through promtool (built once from its Go module; slow the first time).
check-rules: setup
	KVTIER_PROMTOOL=$$(bash hack/build-promtool.sh) .venv/bin/python -m pytest tests/unit/test_alert_rules.py
