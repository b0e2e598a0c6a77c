# The two commands a newcomer needs: `make demo` and `make test`. Both work on a fresh machine.
.PHONY: demo test setup lint unit integration adversarial node image crds bench-store bench-chaos test-vllm check-rules

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

# hostile clients, peers and disks against real agents (also part of `make test`, about a minute)
adversarial: setup
	.venv/bin/python -m pytest -m adversarial tests

# The user's path on real pods: a one-node Kubernetes on this machine (root; skipped elsewhere).
node: setup
	.venv/bin/python -m pytest -m node tests/node

image: setup
	.venv/bin/kvtier image build

crds:
	.venv/bin/kvtier crds --write

bench-store: setup
	.venv/bin/kvtier bench store --out docs/benchmarks/store.json

# the long adversarial run (about 7 minutes on 2 cores): JSON with frames, kills, wrong bytes, leaks
bench-chaos: setup
	.venv/bin/kvtier bench chaos --out docs/benchmarks/chaos.json --frames 3000 --kills 32

# The optional vLLM tier: the connector inside vLLM's real Scheduler and on the KV caches vLLM allocates,
# against the newest supported vLLM and one older release (each in its own virtualenv, vLLM and
# torch from PyPI, about 9 GB each). `make test-vllm VLLM_VERSIONS=0.33.0` tests one.
VLLM_VERSIONS ?= 0.33.0 0.32.0

test-vllm: setup
	@set -e; for v in $(VLLM_VERSIONS); do \
	  venv=.venv-vllm-$$v; \
	  test -x $$venv/bin/python || python3 -m venv $$venv; \
	  $$venv/bin/python -c "import vllm, sys; sys.exit(vllm.__version__ != '$$v')" 2>/dev/null || \
	    $$venv/bin/python -m pip install -q "vllm==$$v" pytest pytest-timeout -e .; \
	  echo "== vLLM $$v"; \
	  HF_HUB_OFFLINE=1 $$venv/bin/python -m pytest -m "vllm or torch" tests/vllm tests/torch; \
	done

# The chart's alert rules through promtool (built once from its Go module; slow the first time).
check-rules: setup
	KVTIER_PROMTOOL=$$(bash hack/build-promtool.sh) .venv/bin/python -m pytest tests/unit/test_alert_rules.py
