# Two entry points for a newcomer (see README):
#   make demo   set up .venv, then run the bundled recipe end to end
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE := egs/synth_digits/asr1
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo demo-quick bench bench-quick clean

$(VENV)/.installed: pyproject.toml constraints.txt $(RECIPE)/requirements.txt
	@$(PYTHON) -c "import shutil; f = shutil.disk_usage('.').free / 2**30; print(f'setup: {f:.1f} GiB free on this disk; the pinned stack (torch with its CUDA libraries) takes about 5.5 GiB in $(VENV) and up to 7.5 GiB while pip runs' + ('' if f >= 8.5 else '. pip may stop with No space left on device.'))"
	$(PYTHON) -m venv $(VENV)
	# The venv's own pip (23.x here) on purpose: newer pip rejects an espnet dependency's metadata.
	# --no-cache-dir: pip would otherwise keep a second copy of the ~2 GiB of downloaded wheels in ~/.cache/pip.
	$(BIN)/pip install --no-cache-dir -c constraints.txt -e ".[test,bench]" -r $(RECIPE)/requirements.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	cd $(RECIPE) && PATH="$(abspath $(BIN)):$$PATH" ./run.sh

demo-quick: setup
	cd $(RECIPE) && PATH="$(abspath $(BIN)):$$PATH" ./run.sh --quick

bench: setup
	$(BIN)/python -m pytest benchmarks --benchmark-enable --benchmark-json=benchmarks/results/latest.json
	$(BIN)/python -m benchmarks.report benchmarks/results/latest.json --out benchmarks/results

bench-quick: setup
	$(BIN)/python -m pytest benchmarks --quick --benchmark-enable --benchmark-min-rounds=1 --benchmark-max-time=0.05

clean:
	rm -rf $(VENV)
