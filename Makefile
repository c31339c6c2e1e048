# Set-up commands: each creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo-out

.PHONY: install test demo serve docs clean

$(BIN)/refiner: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/refiner

test: install
	$(BIN)/python -m pytest -q

# The main job on the embedded default: two base nets on scikit-learn's digits, then a build.
# Sized to stay under 3 minutes on 2 cores (about 2.6): nets of 10 epochs (training accuracy
# 100 %), g bounded to 600 optimiser steps (without --g-steps it is fitted to convergence,
# about 3,000 steps on these features), and 6 head epochs per fine-tuning run.
demo: install
	$(BIN)/refiner train --arch small_vgg --task digits --seed 0 --epochs 10 --out $(DEMO)/a.pt
	$(BIN)/refiner train --arch small_vgg --task digits --seed 1 --epochs 10 --out $(DEMO)/b.pt
	$(BIN)/refiner build --a $(DEMO)/a.pt --b $(DEMO)/b.pt --task digits --head-epochs 6 --g-steps 600 --name digits-refined --models models

serve: install
	$(BIN)/refiner serve --models models

# The API reference, generated from the docstrings, into site/ (open site/index.html).
docs: install
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) $(DEMO) site
