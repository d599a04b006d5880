# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# the demo: speaker folds (at least 2: every speaker is unseen in one fold), its model width, and the
# study folder where the seed discriminator and preset accent train on the same folds
FOLDS  ?= 3
DEMO   ?= --width 0.125 --epochs 12
STUDY  := outputs/runs/demo-study-folds$(FOLDS)

.PHONY: install test demo bench clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# one pytest-xdist worker per core; a test file stays on one worker, so its module fixtures are built once
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

# the seed discriminator and preset accent on the same speaker folds (2 x FOLDS trainings), then the
# three reports of the preset accent run with the study beside it (README, "What you get")
demo: $(STAMP)
	$(PY) -m voxlib.remedies --variants seed,accent --folds $(FOLDS) $(DEMO) --out $(STUDY)
	$(PY) -m voxlib.report --preset accent --folds $(FOLDS) $(DEMO) --run-dir $(STUDY)/accent --study-dir $(STUDY)

bench: $(STAMP)
	$(PY) -m voxlib.bench --quick

clean-outputs:
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
