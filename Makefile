# Two entry points for a newcomer (see README):
#   make demo   set up .venv, then run the bundled recipe end to end
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE := egs/synth_digits/asr1
PYTEST_ARGS ?=

# The declared lower bounds (Python 3.9, torch 2.5.1, espnet 202402), pinned by a pip freeze.
OLDEST_PYTHON ?= python3.9
OLDEST_VENV ?= .venv-oldest

.PHONY: setup test test-fast test-oldest demo demo-bench demo-quick bench bench-interleaved bench-quick clean

# The startup hook is copied into site-packages (pyproject's data files), so a change to it reinstalls.
$(VENV)/.installed: pyproject.toml constraints.txt $(RECIPE)/requirements.txt $(wildcard espnet_mha/_hook/*)
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

# Not run by CI (a second 5 GiB stack); needs $(OLDEST_PYTHON) on PATH.
test-oldest:
	$(OLDEST_PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --no-cache-dir -c .ci/constraints-oldest.txt -e ".[test]"
	$(OLDEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: setup
	cd $(RECIPE) && PATH="$(abspath $(BIN)):$$PATH" ./run.sh
	$(MAKE) --no-print-directory demo-bench

# The side-by-side numbers the demo's own decoder is too small to show: the benchmark's
# 6-layer S4Decoder beam search and 50 decoding steps of one layer (the sizes of the README's
# targets), stock and flash_mha in interleaved rounds on this machine; about 1.5-2 minutes.
demo-bench: setup
	@echo "Stock mha and flash_mha side by side at the benchmark's sizes: s4decoder_beam_search is BatchBeamSearch"
	@echo "over a 6 x [s4, attention, ff] S4Decoder (D=256, vocabulary 500, beam 10, 300 encoder frames);"
	@echo "decode_50_steps is one layer's 50 beam steps at those sizes; attention_replayed is the same search"
	@echo "with attention that costs nothing (the most any attention layer could give). See README.md, Benchmarks."
	mkdir -p .benchmarks
	$(BIN)/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-enable --benchmark-quiet \
		-k "beam_search_interleaved or (interleaved and decode_50_steps and not per_utterance)" \
		--benchmark-json=.benchmarks/demo.json
	$(BIN)/python -m benchmarks.report .benchmarks/demo.json --out .benchmarks/demo

demo-quick: setup
	cd $(RECIPE) && PATH="$(abspath $(BIN)):$$PATH" ./run.sh --quick

bench: setup
	$(BIN)/python -m pytest benchmarks --benchmark-enable --benchmark-json=benchmarks/results/latest.json
	$(BIN)/python -m benchmarks.report benchmarks/results/latest.json --out benchmarks/results

# Only the interleaved cases (stock and ours alternating round by round): the side-by-side
# ratios to trust on a machine whose speed drifts, in about 2-4 minutes on 2 cores.
bench-interleaved: setup
	$(BIN)/python -m pytest benchmarks -k interleaved --benchmark-enable --benchmark-json=benchmarks/results/interleaved.json
	$(BIN)/python -m benchmarks.report benchmarks/results/interleaved.json --out benchmarks/results/interleaved

# The report too, so CI sees it read what the cases write (into .benchmarks/, which git ignores).
bench-quick: setup
	mkdir -p .benchmarks
	$(BIN)/python -m pytest benchmarks --quick --benchmark-enable --benchmark-min-rounds=1 --benchmark-max-time=0.05 \
		--benchmark-json=.benchmarks/quick.json
	$(BIN)/python -m benchmarks.report .benchmarks/quick.json --out .benchmarks/quick

clean:
	rm -rf $(VENV) $(OLDEST_VENV)
