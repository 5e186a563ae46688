# make test: create .venv if missing, install requirements, run the tests.
# make demo: the same set-up, then the whole workflow on a generated dfme-difficulty dataset
#            (the full-sequence model and the onset-apex baseline, both scored on test_B).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= DFME_demo
DEMO_ARGS ?= --difficulty dfme --fps 200 --frame-format jpg --subjects 16 --clips-per-subject 6 --split-subjects 10 3 3

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
	test -f $(DEMO)/train.xlsx || $(PY) -m mer.synth --out $(DEMO) $(DEMO_ARGS) --workers 2
	$(PY) preprocess.py --root $(DEMO) --workers 2
	$(PY) train.py --fold all --config mer/configs/demo.yaml --name demo
	$(PY) train.py --fold all --config mer/configs/demo.yaml --model apex_cnn --name demo_apex
	$(PY) predict.py --split test_B --name demo_apex --truth $(DEMO).truth/test_B.csv --no-archive > /dev/null
	$(PY) predict.py --split test_B --name demo --truth $(DEMO).truth/test_B.csv > $(DEMO)_submission.csv
	@echo "submission: $(DEMO)_submission.csv (upload files: the newest submissions/test_B-demo-*/prediction.zip)"

clean-demo:
	rm -rf $(DEMO) $(DEMO).truth $(DEMO)_submission.csv cache/$(DEMO) runs/demo runs/demo_apex submissions/test_B-demo-*
