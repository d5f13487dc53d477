# The SoupLM study on the real 135M model family (docs/RESULTS.md), offline, on CPU.
#   make experiment        full run: builds (or finds) the family, then the study (hours: see settings.FULL)
#   make experiment-large  the same at issue 16's test-set sizes (settings.LARGE; scratch/experiment-large)
#   make experiment-quick  the same pipeline on the quick family with a few rows and steps (minutes);
#                          writes scratch/experiment-quick/RESULTS.md (ignored by git), never docs/RESULTS.md
# Both resume from the caches (~/.cache/souplm/family, or CACHE=DIR) after an interruption.

PYTHON ?= python
CACHE ?=
CACHE_ARG := $(if $(CACHE),--cache $(CACHE),)

.PHONY: experiment experiment-large experiment-quick experiment-check eval-throughput

experiment-check:
	$(PYTHON) -m souplm.experiment.run --check

experiment: experiment-check
	$(PYTHON) -m souplm.experiment.family build $(CACHE_ARG)
	$(PYTHON) -m souplm.experiment.run $(CACHE_ARG) --out docs

experiment-large: experiment-check
	$(PYTHON) -m souplm.experiment.family build $(CACHE_ARG)
	$(PYTHON) -m souplm.experiment.run --large $(CACHE_ARG)

# Evaluation throughput, plain against fast scoring paths, on a LLaVA of the quick family (ROWS per task).
ROWS ?= 16
eval-throughput:
	$(PYTHON) benchmarks/eval_throughput.py $$(ls -d $${SOUPLM_CACHE:-$$HOME/.cache/souplm}/family/quick/llava-* | head -1) --rows $(ROWS)

experiment-quick: experiment-check
	$(PYTHON) -m souplm.experiment.family build --quick $(CACHE_ARG)
	$(PYTHON) -m souplm.experiment.run --quick $(CACHE_ARG) --out scratch/experiment-quick
