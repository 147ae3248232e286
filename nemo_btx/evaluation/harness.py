"""`python -m nemo_btx.evaluation.harness ...`: lm-eval's own command line with this project's
models and tasks registered.

lm-eval 0.4.13 has no plugin hook: `--model` is looked up in a registry filled by imports, and
`--include_path` loads task YAMLs only after the model is built, so a task file cannot bring a
model with it. This entry point registers `nemo-btx` and `nemo-btx-btm` (lazily: nothing heavy
is imported until one is chosen) and adds `eval/` as the task path, then hands argv to lm-eval:

    python -m nemo_btx.evaluation.harness run --model nemo-btx \\
        --model_args checkpoint=runs/tiny/seed/weights --tasks btx_mmlu --limit 5

The plain `lm_eval` command gets the same models when `register()` runs at interpreter start,
e.g. from a `.pth` file in site-packages (`install_pth()` writes one).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from nemo_btx.evaluation.lm_eval_hook import MODELS, register_into  # noqa: F401 - MODELS re-exported

PTH_NAME = "nemo_btx_lm_eval.pth"


def register() -> None:
    """Add our models to lm-eval's registry as lazy placeholders, after lm-eval's own (idempotent)."""
    from lm_eval.api.registry import model_registry

    register_into(model_registry)


def _with_task_path(argv: List[str]) -> List[str]:
    from nemo_btx.evaluation.runner import EVAL_DIR

    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    if "--tasks" in argv or any(a.startswith("--tasks=") for a in argv):
        return [*argv, "--include_path", str(EVAL_DIR)]
    return argv


def main(argv: Optional[List[str]] = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from nemo_btx.evaluation.benchmarks import offline_env

    offline_env()
    register()
    sys.argv = [sys.argv[0], *_with_task_path(list(sys.argv[1:] if argv is None else argv))]
    cli_evaluate()


def install_pth(site_dir: Optional[str] = None) -> Path:
    """Write a .pth that registers our models whenever lm_eval's registry is imported.

    The hook is a tiny import finder, so interpreters that never import lm_eval pay nothing.
    """
    import site

    target = Path(site_dir or site.getsitepackages()[0]) / PTH_NAME
    target.write_text("import nemo_btx.evaluation.lm_eval_hook as _h; _h.install()\n")
    return target


if __name__ == "__main__":
    main()
