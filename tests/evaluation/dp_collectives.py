"""lm-eval's distributed interface over gloo (run under torchrun with 2 processes): the
collectives the evaluator calls, and the in-order map perplexity uses. Rank 0 writes JSON."""

import json
import sys

import torch


def main(out: str) -> None:
    from nemo_btx.config.schema import ExperimentConfig
    from nemo_btx.evaluation.data_parallel import DataParallel, map_in_order
    from nemo_btx.runtime.distributed import init_runtime, shutdown

    init_runtime(ExperimentConfig())
    dp = DataParallel()
    dp._init_data_parallel(torch.device("cpu"))
    # What lm-eval's evaluator does with it: per-rank request counts from a scalar
    counts = dp.all_gather(torch.tensor(10 + dp.rank)).tolist()
    rows = dp.all_gather(torch.full((2, 3), float(dp.rank))).tolist()
    objs = dp.gather_object({"rank": dp.rank})
    mapped = map_in_order(lambda x: (x * x, torch.distributed.get_rank()), list(range(7)))
    dp.barrier()
    if dp.rank == 0:
        json.dump({"rank": dp.rank, "world": dp.world_size, "counts": counts, "rows": rows,
                   "objs": objs, "mapped": mapped}, open(out, "w"))
    else:
        assert objs is None
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
