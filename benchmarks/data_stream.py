"""The streaming data path against reading a split into memory, on 256px JPEG webdataset shards.

    .venv/bin/python benchmarks/data_stream.py [--per-shard 200] [--shards 2,20] [--workers 1,2] [--out FILE]

Shards hold real images (Noto Color Emoji rendered at 256px when the Debian font is
installed, else the embedded shapes drawn at 256px) as JPEG (quality 90) with captions, in
``dalle data shards``' layout. Printed as one JSON object:

- ``throughput``: one process streaming one epoch of the largest shard set with N DataLoader
  workers (0: in the process; read, JPEG decode, batches of 32): samples/s and samples/s per
  worker; beside it the loader that reads the whole split into memory first (``load_split``,
  what training did before streaming).
- ``memory``: 2 ranks under torchrun (gloo), each streaming its share of an epoch with 2
  workers, or loading the split the old way, for each shard count (10x more shards, 10x
  more data): peak RSS (VmHWM) of each rank's process (its DataLoader workers are processes
  of their own, each holding one block of raw records). Flat across shard counts is the
  target for the stream.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_shards(folder: Path, shards: int, per_shard: int, size: int = 256) -> tuple[list[str], str]:
    """``shards`` tar files of ``per_shard`` JPEG samples each; returns their paths and what the images are."""
    import webdataset as wds
    from PIL import Image

    from dalle_framework.plugins import registry

    try:
        source, what = registry("data").build({"name": "emoji", "params": {"image_size": size}}), "emoji"
    except Exception:
        source, what = registry("data").build({"name": "shapes", "params": {"image_size": size, "samples_per_caption": 200}}), "shapes"
    images = []
    for sample in source.samples("train"):
        images.append(sample)
        if len(images) == 500:
            break
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = folder / f"train-{shard:06d}.tar"
        with open(path, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False)
            for i in range(per_shard):
                sample = images[(shard * per_shard + i) % len(images)]
                jpeg = io.BytesIO()
                Image.fromarray(sample.image).save(jpeg, format="JPEG", quality=90)
                writer.write({"__key__": f"{shard:06d}{i:06d}", "jpg": jpeg.getvalue(), "txt": sample.caption.encode()})
            writer.close()
        paths.append(str(path))
    return paths, f"{what} at {size}px, JPEG quality 90"


def _source(paths: list[str]):
    from dalle_framework.plugins import registry

    return registry("data").build({"name": "webdataset", "params": {"train_urls": paths, "image_size": 256}})


def _record(sample):
    from dalle_framework.data import image_tensor

    return (image_tensor(sample.image),)


def stream_epoch(paths: list[str], workers: int, *, rank: int = 0, world: int = 1, batch_size: int = 32) -> dict:
    """One epoch of this rank's share, streamed; samples/s."""
    from dalle_framework.data.stream import StreamBatches, count_records

    split = _source(paths).stream("train").map(_record)
    counts = count_records(split)
    share = sum(counts) // world
    stream = StreamBatches(split, counts, batch_size=batch_size, seed=0, rank=rank, world_size=world, workers=workers)
    start = time.perf_counter()
    seen = 0
    while seen < share - batch_size + 1:
        seen += len(next(stream)[0])
    seconds = time.perf_counter() - start
    stream.close()
    return {"samples": seen, "seconds": round(seconds, 2), "samples_per_s": round(seen / seconds, 1)}


def load_whole(paths: list[str]) -> dict:
    from dalle_framework.data import load_split

    start = time.perf_counter()
    images, _ = load_split(_source(paths), "train", progress=False)
    seconds = time.perf_counter() - start
    return {"samples": len(images), "seconds": round(seconds, 2), "samples_per_s": round(len(images) / seconds, 1),
            "bytes_held": int(images.numel())}


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rank_main(args) -> None:
    """Under torchrun: this rank streams its share of an epoch (or loads the split); writes its peak RSS."""
    from dalle_framework import distributed

    distributed.init_distributed(backend="gloo")
    rank, world = distributed.rank(), distributed.world_size()
    paths = json.loads(Path(args.paths).read_text())
    if args.mode == "stream":
        result = stream_epoch(paths, 2, rank=rank, world=world)
    else:
        result = load_whole(paths)  # what every rank did before streaming
    result["peak_rss_mib"] = round(_vm_hwm() / 2**20, 1)
    Path(args.out, f"{args.mode}-rank{rank}.json").write_text(json.dumps(result))


def per_rank_memory(paths: list[str], mode: str, work: Path) -> list[dict]:
    from dalle_framework.distributed import free_port

    out = work / f"{mode}-{len(paths)}"
    out.mkdir()
    (out / "paths.json").write_text(json.dumps(paths))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    __file__, "--rank-main", "--mode", mode, "--paths", str(out / "paths.json"), "--out", str(out)],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--shards", default="2,20", help="shard counts for the memory comparison")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader workers for the throughput figures (0: in this process)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        return rank_main(args)
    import torch

    torch.set_num_threads(1)
    counts = [int(c) for c in args.shards.split(",")]
    report: dict = {"machine": {"cpus": os.cpu_count()}, "per_shard": args.per_shard}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = {}
        for count in counts:
            shards[count], report["images"] = make_shards(work / f"shards-{count}", count, args.per_shard)
        large = shards[counts[-1]]
        report["throughput"] = {"load_split (whole split into memory, in this process)": load_whole(large)}
        for workers in (int(w) for w in args.workers.split(",")):
            result = stream_epoch(large, workers)
            result["samples_per_s_per_worker"] = round(result["samples_per_s"] / max(workers, 1), 1)
            report["throughput"][f"stream, {workers} worker(s)"] = result
        report["memory"] = {
            f"{count} shards ({count * args.per_shard} samples)": {
                "stream (2 workers per rank)": per_rank_memory(shards[count], "stream", work),
                "load_split (before streaming)": per_rank_memory(shards[count], "load", work),
            }
            for count in counts
        }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
