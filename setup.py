"""The one packaging rule pyproject.toml cannot state: ship the top-level `conf/` (Hydra presets)
and `eval/` (lm-eval task YAMLs) inside the wheel as the data-only packages `nemo_btx._conf` and
`nemo_btx._eval`, next to every package found under `nemo_btx/` (pyproject's
`packages = {find = ...}` cannot be combined with extra mapped packages, and a fixed list would
have to follow every new subpackage). Metadata, dependencies and entry points are in
pyproject.toml; `nemo_btx/resources.py` finds the directories at run time.
"""

from setuptools import find_namespace_packages, find_packages, setup

DATA = {"nemo_btx._conf": "conf", "nemo_btx._eval": "eval"}
# eval/mmlu/_btx_mmlu_template_yaml has no .yaml suffix on purpose (lm-eval would index it as a
# task); python/json/txt files beside the task YAMLs are what a `!function` may load.
FILES = ["*.yaml", "*_yaml", "*.py", "*.json", "*.txt"]
# Their subdirectories (conf/model, eval/mmlu, ...) are listed too: setuptools ships a directory's
# files only for a listed package.
DATA_PACKAGES = [f"{pkg}.{sub}" if sub else pkg for pkg, src in DATA.items()
                 for sub in ["", *find_namespace_packages(where=src, exclude=["*__pycache__*"])]]

setup(
    packages=find_packages(include=["nemo_btx", "nemo_btx.*"]) + DATA_PACKAGES,
    package_dir=DATA,
    package_data={pkg: FILES for pkg in DATA_PACKAGES},
)
