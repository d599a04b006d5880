# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# speaker folds of the demo (each is one training); FOLDS=1 trains one split
FOLDS  ?= 3

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

# 3 speaker folds: every demo speaker is unseen once (3 trainings; see README, Splits)
demo: $(STAMP)
	$(PY) -m voxlib.report --folds $(FOLDS)

bench: $(STAMP)
	$(PY) -m voxlib.bench --quick

clean-outputs:
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
