"""Worker for the multi-rank stream tests: ``torchrun --nproc_per_node R tests/stream_worker.py ARGS.json``.

Every rank streams the webdataset shards of ``urls`` with :class:`StreamBatches` (the rank and
world size come from the real gloo process group), draws ``batches`` batches and writes the
keys of each to ``OUT/rank{R}.json``. With ``load``, it first continues from the positions in
that JSON file (all ranks' states, as the training loop saves them); with ``save``, rank 0
writes every rank's final position there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    args = json.loads(Path(sys.argv[1]).read_text())
    from dalle_framework import distributed
    from dalle_framework.data.stream import StreamBatches, count_records
    from dalle_data import WebDatasetSource

    distributed.init_distributed(backend="gloo")
    rank, world = distributed.rank(), distributed.world_size()
    source = WebDatasetSource(WebDatasetSource.Params(train_urls=args["urls"]))
    split = source.stream("train").map(_key)
    counts = count_records(split, collective=True)
    stream = StreamBatches(split, counts, batch_size=args["batch_size"], seed=args.get("seed", 0), rank=rank, world_size=world,
                           workers=args["workers"], shuffle_block=args.get("shuffle_block", 7))
    if args.get("load"):
        stream.load_state_dict(json.loads(Path(args["load"]).read_text()))
    keys = [next(stream)[0] for _ in range(args["batches"])]
    states = distributed.all_gather_object(stream.state_dict())
    stream.close()
    out = Path(args["out"])
    (out / f"rank{rank}.json").write_text(json.dumps(keys))
    if args.get("save") and rank == 0:
        Path(args["save"]).write_text(json.dumps(states))
    if dist.is_initialized():
        dist.destroy_process_group()


def _key(sample) -> tuple:
    return (sample.key,)


if __name__ == "__main__":
    main()
