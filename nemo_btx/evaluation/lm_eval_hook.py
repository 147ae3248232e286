"""Registers nemo-btx's lm-eval models the moment `lm_eval.api.registry` is imported.

Loaded from a `.pth` file (`harness.install_pth()`), i.e. at every interpreter start, so it
imports nothing but the standard library until lm-eval itself is imported.
"""

import importlib.abc
import sys

_TARGET = "lm_eval.api.registry"


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            for alias, target_path in {"nemo-btx": "nemo_btx.evaluation.lm:NemoBtxLM",
                                       "nemo-btx-btm": "nemo_btx.evaluation.btm:BTMLM"}.items():
                if alias not in module.model_registry:
                    module.model_registry.register(alias, target=target_path)

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if _TARGET not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
