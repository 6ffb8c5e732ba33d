# Development shortcuts. Each target runs the script or module named, nothing more:
#   make test         scripts/test (bootstrap, ruff, mypy, pytest), as CI runs it
#   make demo         scripts/demo (bootstrap, then `pumpgw demo`)
#   make bench        the whole benchmark suite (.venv/bin/python -m bench): prints a table,
#                     writes bench/results.json; under 15 minutes on 2 cores
#   make bench-quick  the same at small sizes, a smoke check: writes bench/results-quick.json
# BENCH_ARGS passes options on, e.g. `make bench BENCH_ARGS=--only=drain,latency`.

PYTHON := .venv/bin/python
BENCH_ARGS ?=

.PHONY: bench bench-quick test demo

bench: $(PYTHON)
	$(PYTHON) -m bench $(BENCH_ARGS)

bench-quick: $(PYTHON)
	$(PYTHON) -m bench --quick $(BENCH_ARGS)

test:
	scripts/test

demo:
	scripts/demo

# Only when .venv is missing; scripts/test and scripts/demo bootstrap every time themselves.
$(PYTHON):
	scripts/bootstrap.sh
