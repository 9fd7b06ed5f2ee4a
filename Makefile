# avprobe: `make claims` runs the claims suite on the model organisms and writes the report;
# `make test` runs the engine's tests. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: claims test venv clean-venv

venv: $(STAMP)

# torch==2.13.0 first (the local CPU wheel); an existing torch, e.g. a CUDA build a GPU user
# installed into .venv, is kept: pip then finds the requirement satisfied.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,embed]"
	@$(PY) -c "import torch; print('torch', torch.__version__)"
	@touch $(STAMP)

claims: $(STAMP)
	$(PY) -m pytest claims/ -p no:cacheprovider --model organism-deep-lens --model organism-deep-control \
		--model organism-deep-flipped --model organism-deep-guesser --model organism-deep-partial \
		--model organism-deep-sound-first \
		--verdicts claims/verdicts --report reports/claims.html

test: $(STAMP)
	$(PY) -m pytest tests/ -p no:cacheprovider -n 2 -q

clean-venv:
	rm -rf $(VENV)
