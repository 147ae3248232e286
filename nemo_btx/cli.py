"""`nemo-btx <command> [key=value ...]`: the only place that parses argv and exits the process.

Commands are the pipeline's stages (the paper's verbs) plus helpers to inspect a config. Each
stage module is imported only when chosen, so `--help` and `validate` start in well under a
second without torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Dict, List, Optional, Tuple

from nemo_btx.errors import BtxError, ConfigError, NotImplementedStageError

log = logging.getLogger("nemo_btx")

#: command -> (one-line help, "module:function" or None while the issue that fills it is open).
COMMANDS: Dict[str, Tuple[str, Optional[str], str]] = {
    "run": ("the whole experiment, data to report, skipping complete stages (--from/--only)",
            "nemo_btx.orchestration.local:run", ""),
    "smoke": ("build a tiny dense and MoE model and train a few steps",
              "nemo_btx.stages.smoke:run", ""),
    "validate": ("resolve the config and check it (keys, types, parallel layout); no GPU needed",
                 None, "builtin"),
    "config": ("print the resolved config as YAML", None, "builtin"),
    "plan": ("per-GPU memory, step time, tokens and GPU-days of every stage at its layout",
             None, "builtin"),
    "data": ("tokenizer and per-domain indexed datasets", "nemo_btx.stages.data:run", ""),
    "seed": ("pre-train (or adopt) the seed model on the general mixture",
             "nemo_btx.stages.seed:run", ""),
    "branch": ("copy the seed into one expert directory per domain", "nemo_btx.stages.branch:run", ""),
    "train-expert": ("continue one expert on its domain (domain=NAME or domain_index=I)",
                     "nemo_btx.stages.train_expert:run", ""),
    "train": ("a plain training run on megatron-core (job.*, train.*)", "nemo_btx.stages.train:run", ""),
    "mix": ("merge the experts into one megatron-core MoE checkpoint", "nemo_btx.stages.mix:run", ""),
    "upcycle": ("sparse-upcycling baseline: the seed's FFN copied into every expert",
                "nemo_btx.stages.upcycle:run", ""),
    "finetune": ("train the MoE with top-k routing and load balancing", "nemo_btx.stages.finetune:run", ""),
    "baselines": ("sparse upcycling (data-/compute-matched) and dense baselines, matched to BTX",
                  "nemo_btx.stages.baselines:run", ""),
    "eval": ("lm-eval tasks (GSM8K, HumanEval, MMLU), BTM ensemble and domain perplexity",
             "nemo_btx.stages.evaluate:run", ""),
    "report": ("Markdown/HTML/JSON comparison report of the run directory",
               "nemo_btx.stages.report:run", ""),
    "launch": ("submit the experiment as a Slurm job chain (cluster.*; cluster.dry_run=true: render only)",
               "nemo_btx.orchestration.launch:run", ""),
    "import-hf": ("import a Hugging Face Llama checkpoint as the seed (hf.path=DIR)",
                  "nemo_btx.stages.hf:import_hf", ""),
    "export-hf": ("export a dense model as Llama or the MoE as Mixtral (hf.model=NAME or hf.path=DIR)",
                  "nemo_btx.stages.hf:export_hf", ""),
}


def _parser() -> argparse.ArgumentParser:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name:<{width}}  {text}" + (f"  [not yet: {where}]" if fn is None and where != "builtin" else "")
             for name, (text, fn, where) in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="nemo-btx",
        description="Branch-Train-MiX on megatron-core. Configs: conf/*.yaml, overridden NeMo-style "
                    "with key=value (e.g. model.num_layers=4 parallel.tp=2, or model=llama2_7b).",
        epilog="commands:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--config-name", default="config",
                        help="primary config under conf/ (default: config)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE[:ITEM]",
                        help="run: redo this stage (or one item, e.g. experts:math) and all after it")
    parser.add_argument("--only", metavar="STAGE[:ITEM],...",
                        help="run: redo just these stages or items (e.g. eval:btx,report)")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="command",
                        help="one of the commands below")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def _builtin(command: str, overrides: List[str], config_name: str) -> int:
    from nemo_btx.config import load_config, to_yaml, validate

    cfg = load_config(overrides, config_name=config_name)
    if command != "config":
        from nemo_btx.planner.scale import check_scale

        check_scale(cfg)
    if command == "config":
        sys.stdout.write(to_yaml(cfg))
        print(budgets_comment(cfg))
        return 0
    from nemo_btx.model.agreement import check_seed

    if command == "plan":
        from nemo_btx.orchestration.planning import plan_experiment, render

        validate(cfg)
        check_seed(cfg)
        print(render(cfg, plan_experiment(cfg, overrides, config_name)))
        return 0
    world = validate(cfg)
    check_seed(cfg)
    _check_fits(cfg, overrides, config_name)
    p = cfg.parallel
    print(f"config OK: model {cfg.model.name} ({cfg.model.num_layers} layers, hidden "
          f"{cfg.model.hidden_size}, {'dense' if cfg.model.moe.num_experts is None else str(cfg.model.moe.num_experts) + ' experts'}), "
          f"world {world} = tp {p.tp} x pp {p.pp} x cp {p.cp} x dp {world // (p.tp * p.pp * p.cp)}"
          f"{f', ep {p.ep}' if p.ep > 1 else ''}")
    return 0


def budgets_comment(cfg) -> str:
    """The stage budgets in steps, as YAML comments under `nemo-btx config`."""
    from nemo_btx.config.budgets import stage_iters, tokens_per_step

    per_step = tokens_per_step(cfg)
    parts = [f"seed {stage_iters(cfg, 'seed')}"] if cfg.seed.checkpoint is None else []
    from nemo_btx.config.schema import expert_domains

    parts += [f"experts:{d} {stage_iters(cfg, 'experts', d)}" for d in expert_domains(cfg)]
    parts.append(f"finetune {stage_iters(cfg, 'finetune')}")
    return f"# steps at {per_step:,} tokens per step: " + ", ".join(parts)


def _check_fits(cfg, overrides: List[str], config_name: str) -> None:
    """On a GPU cluster: every stage's predicted memory within cluster.gpu_memory_gb."""
    if cfg.cluster.gpus_per_node > 0 and cfg.plan.check:
        from nemo_btx.orchestration.planning import check_fits

        check_fits(cfg, overrides, config_name)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.version:
        from nemo_btx import __version__
        print(f"nemo-btx {__version__}")
        return 0
    if args.command is None:
        _parser().print_help()
        return 2
    from nemo_btx.log import init_logger

    init_logger(args.log_level)
    text, target, where = COMMANDS[args.command]
    try:
        if where == "builtin":
            return _builtin(args.command, args.overrides, args.config_name)
        if target is None:
            raise NotImplementedStageError(
                f"'{args.command}' is listed but not implemented yet ({where} delivers it)")
        from nemo_btx.config import load_config, validate
        from nemo_btx.config.validate import check_config

        from nemo_btx.planner.scale import check_scale

        cfg = load_config(args.overrides, config_name=args.config_name)
        if args.command not in ("import-hf", "export-hf"):  # (importing is how a seed is made)
            check_scale(cfg)  # a 7B model on the toy corpora, or without its seed: refused first
        check_config(cfg)  # every section, before a stage module loads or reads a checkpoint
        if args.command in ("run", "launch"):
            # The whole experiment: its merge recipes and benchmark data are checked now,
            # not after days of expert training.
            from nemo_btx.orchestration.experiment import preflight

            preflight(cfg)
            _check_fits(cfg, args.overrides, args.config_name)
        module_name, func = target.split(":")
        module = importlib.import_module(module_name)
        # A stage whose model comes from its input checkpoint (finetune) resolves it first,
        # so the layout is validated against the model that will actually be built.
        if hasattr(module, "resolve_config"):
            cfg = module.resolve_config(cfg)
        validate(cfg)
        fn: Callable = getattr(module, func)
        if args.command == "run":
            fn(cfg, overrides=args.overrides, config_name=args.config_name,
               from_stage=args.from_stage, only=args.only)
        elif args.command == "launch":
            if args.from_stage or args.only:
                raise ConfigError("--from/--only", args.from_stage or args.only, "only `run` takes them")
            fn(cfg, overrides=args.overrides, config_name=args.config_name)
        else:
            if args.from_stage or args.only:
                raise ConfigError("--from/--only", args.from_stage or args.only, "only `run` takes them")
            fn(cfg)
        return 0
    except ConfigError as err:
        print(f"nemo-btx: config error: {err}", file=sys.stderr)
        return 2
    except NotImplementedStageError as err:
        print(f"nemo-btx: {err}", file=sys.stderr)
        return 2
    except BtxError as err:
        print(f"nemo-btx: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
