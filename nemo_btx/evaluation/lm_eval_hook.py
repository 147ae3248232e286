"""Registers nemo-btx's lm-eval models the moment `lm_eval.api.registry` is imported.

Loaded from a `.pth` file (`harness.install_pth()`), i.e. at every interpreter start, so it
imports nothing but the standard library until lm-eval itself is imported.

lm-eval 0.4.13's registry is lazy: `get_model` imports `lm_eval.models` (whose import registers
lm-eval's own models, `hf`, `vllm`, ..., as placeholders) only while the registry is EMPTY. So
ours are added after lm-eval's: registering them into the empty registry would leave lm-eval's
own models out of it for good (`lm_eval --model hf` would fail with "no model for this name
found! Supported model names: nemo-btx, nemo-btx-btm").
"""

import importlib.abc
import sys

_TARGET = "lm_eval.api.registry"
#: lm-eval model name -> "module:Class", resolved by lm-eval only when chosen.
MODELS = {
    "nemo-btx": "nemo_btx.evaluation.lm:NemoBtxLM",
    "nemo-btx-btm": "nemo_btx.evaluation.btm:BTMLM",
}


def register_into(model_registry) -> None:
    """lm-eval's own placeholders first (importing lm_eval.models fills them), then ours."""
    import lm_eval.models  # noqa: F401 - fills lm-eval's placeholders; ours must not come first

    for alias, target in MODELS.items():
        if alias not in model_registry:
            model_registry.register(alias, target=target)


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
            register_into(module.model_registry)

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if _TARGET not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
