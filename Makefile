# Two commands for people: `make run` and `make test`. Each sets up its own .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 9090

.PHONY: setup run predict-example test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (3.11 is what is tested): make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

## The main job. Without LABEL_STUDIO_URL, the whole loop on this machine (`seggpt-backend quickstart`):
## Label Studio on port LS_PORT (8080), the backend on HOST:PORT (127.0.0.1:9090) and a pre-labelled demo
## project; Ctrl-C stops it all. With LABEL_STUDIO_URL, only the backend that Label Studio connects to
## (HOST 0.0.0.0). `exec` makes the server make's own child, so the SIGTERM that make forwards reaches it.
run: setup
ifeq ($(strip $(LABEL_STUDIO_URL)),)
	exec $(VENV)/bin/seggpt-backend quickstart --host $(or $(HOST),127.0.0.1) --port $(PORT)
else
	exec $(VENV)/bin/seggpt-backend serve --host $(or $(HOST),0.0.0.0) --port $(PORT)
endif

## Segment the bundled example query in context of the bundled prompt (writes out/example/).
predict-example: setup
	$(PY) -m seggpt_model predict \
		--prompt seggpt_model/assets/example_prompt.jpg --prompt-mask seggpt_model/assets/example_prompt_mask.png \
		--query seggpt_model/assets/example_query.jpg --out out/example

## The whole test suite (end-to-end tests install their own Label Studio first).
test: setup
	bash scripts/install_label_studio.sh
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) out
