# The SoupLM study on the real 135M model family (docs/RESULTS.md), offline, on CPU.
#   make experiment        full run: builds (or finds) the family, then about two hours of experiment
#   make experiment-quick  the same pipeline on the quick family with a few rows and steps (minutes);
#                          writes scratch/experiment-quick/RESULTS.md (ignored by git), never docs/RESULTS.md
# Both resume from the caches (~/.cache/souplm/family, or CACHE=DIR) after an interruption.

PYTHON ?= python
CACHE ?=
CACHE_ARG := $(if $(CACHE),--cache $(CACHE),)

.PHONY: experiment experiment-quick experiment-check

experiment-check:
	$(PYTHON) -m souplm.experiment.run --check

experiment: experiment-check
	$(PYTHON) -m souplm.experiment.family build $(CACHE_ARG)
	$(PYTHON) -m souplm.experiment.run $(CACHE_ARG) --out docs

experiment-quick: experiment-check
	$(PYTHON) -m souplm.experiment.family build --quick $(CACHE_ARG)
	$(PYTHON) -m souplm.experiment.run --quick $(CACHE_ARG) --out scratch/experiment-quick
