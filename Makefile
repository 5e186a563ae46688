# make test: create .venv if missing, install requirements, run the tests.
# make demo: the same set-up, then the whole workflow on a generated dataset.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= DFME_demo
DEMO_ARGS ?= --subjects 16 --clips-per-subject 6 --split-subjects 10 3 3

.PHONY: test demo install clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m mer.synth --out $(DEMO) $(DEMO_ARGS)
	$(PY) -m mer.data --root $(DEMO)

clean-demo:
	rm -rf $(DEMO) $(DEMO).truth cache/$(DEMO) runs/demo
