"""Write a randomly initialised MoE as if `nemo-btx mix` had: python make_moe.py OUT key=value..."""

import sys

from nemo_btx.config import load_config


def main(out, overrides):
    from nemo_btx.model.build import build_model
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.training.checkpoint import save_model_weights

    cfg = load_config(overrides)
    init_runtime(cfg)
    save_model_weights(build_model(cfg, wrap_ddp=False), out, cfg.model, extra={"stage": "test"})
    shutdown()


if __name__ == "__main__":  # the checkpoint writer re-imports __main__
    main(sys.argv[1], sys.argv[2:])
