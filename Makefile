# The two commands a new machine needs: `make demo` and `make test`.
# Each creates its own virtualenv in .venv and installs the package into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test chaos demo protos lint bench bench-lines bench-tiny bench-core bench-planning bench-latency bench-discovery bench-pool bench-worker packages clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The tests run a real redis-server (the Redis store) and tcpdump (what an
# eavesdropper sees of a job): install them when missing (Debian's
# packages; CI runs as root). Without root, tcpdump is optional: its tests
# skip, saying why.
packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v tcpdump >/dev/null || missing="$$missing tcpdump"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  elif ! command -v redis-server >/dev/null; then \
	    echo "redis-server is missing: install Redis 6+ (e.g. sudo apt-get install redis-server)"; exit 1; \
	  fi; \
	fi

test: $(STAMP) packages
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# Long fault runs (a 60 s discovery outage, a soak of freezing and dying
# workers); `make test` runs a representative subset.
chaos: $(STAMP) packages
	$(PY) -m pytest -q -s -m chaos

demo: $(STAMP)
	$(PY) example.py
	$(PY) examples/stdlib_wordcount.py --megabytes 5

# Regenerate ec262/v1 from protos/ (the folders match the proto package, so
# the generated imports are absolute: `from ec262.v1 import ...`).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/ec262/v1/*.proto

lint: $(STAMP)
	$(PY) -m ruff check .

# Word count and per-task overhead of jobs (one table); the services' own
# benchmarks are separate. `make bench ARGS=--profile` adds where the CPU goes.
bench: $(STAMP)
	$(PY) bench/job_bench.py $(ARGS)

# Line-shaped input beside the sequential loop and Dask distributed (which
# only this bench needs, so it is installed here, not with the package).
bench-lines: $(STAMP)
	$(PY) -m pip install --quiet 'dask[distributed]'
	$(PY) bench/lines_bench.py $(ARGS)

# Tiny tasks (issue 16, item 4) beside Dask running them once and 3 times.
bench-tiny: $(STAMP)
	$(PY) -m pip install --quiet 'dask[distributed]'
	$(PY) bench/tiny_bench.py $(ARGS)

# The foreman core's CPU per event with many tasks open, decided or waiting.
bench-core: $(STAMP)
	$(PY) bench/core_bench.py $(ARGS)

bench-planning: $(STAMP)
	$(PY) bench/planning_bench.py --job $(ARGS)

bench-latency: $(STAMP)
	$(PY) bench/latency_bench.py $(ARGS)

bench-discovery: $(STAMP)
	$(PY) bench/discovery_cycles.py

# RequestTasks with 30 vs 10,000 live workers, both stores (issue 16, item 5)
bench-pool: $(STAMP) packages
	$(PY) bench/discovery_cycles.py --pool-scale

bench-worker: $(STAMP)
	$(PY) bench/worker_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
