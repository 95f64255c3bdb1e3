"""Write any data source as webdataset tar shards.

Layout: ``<out>/<split>-000000.tar`` ... each holding ``NNNNNN.png`` (the image),
``NNNNNN.txt`` (the caption, UTF-8) and ``NNNNNN.json`` (the source key and
meta). ``NNNNNN`` counts samples within the split, so keys never repeat across
its shards. Read them back with the ``webdataset`` data source.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from PIL import Image

from ..errors import UsageError, write_failed
from ..rundir import WRITE_ERRORS, write_json
from .images import _as_uint8_hwc

log = logging.getLogger(__name__)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_as_uint8_hwc(image), "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _json_safe(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=str))


def write_shards(
    source: Any,
    out_dir: Union[str, os.PathLike],
    *,
    splits: Sequence[str] = ("train", "heldout"),
    max_per_shard: int = 1000,
    limit: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write each split of ``source`` (a DataSource) to ``out_dir``.

    Returns ``{split: {"count": n, "shards": k, "pattern": "<out>/<split>-{000000..00000k}.tar"}}``
    plus ``"skipped"`` (samples the source skipped). ``limit`` caps samples per split.
    A ``stats.json`` with the same content is written next to the shards.
    """
    if max_per_shard < 1:
        raise UsageError(f"max_per_shard must be >= 1, got {max_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {split: _write_split(source, split, out, max_per_shard, limit, progress) for split in splits}
    result["skipped"] = int(getattr(source, "skipped", 0))
    write_json(out / "stats.json", result)
    return result


def _write_split(source: Any, split: str, out: Path, max_per_shard: int, limit: Optional[int], progress: bool) -> dict[str, Any]:
    """One split as ``<out>/<split>-NNNNNN.tar`` shards of ``max_per_shard`` samples: its count, shards and brace pattern."""
    import webdataset as wds

    from ..progress import progress_bar

    count, shard, writer, stream = 0, -1, None, None
    total = source.size(split)
    if limit is not None:
        total = limit if total is None else min(total, limit)
    bar = progress_bar(total=total, desc=f"shards {split}", unit="img", enabled=progress)
    try:
        for sample in source.samples(split):
            if limit is not None and count >= limit:
                break
            meta = _json_safe({"key": sample.key, **(sample.meta or {})})
            record = {"__key__": f"{count:06d}", "png": _png(sample.image), "txt": sample.caption.encode("utf-8"),
                      "json": json.dumps(meta).encode("utf-8")}
            try:  # a full disk mid-shard is a bare OSError: named here
                if count % max_per_shard == 0:  # start the next shard
                    if writer is not None:
                        writer.close()
                        stream.close()
                    shard += 1
                    stream = open(out / f"{split}-{shard:06d}.tar", "wb")
                    writer = wds.TarWriter(stream, encoder=False)
                writer.write(record)
            except WRITE_ERRORS as exc:
                raise write_failed(out / f"{split}-{shard:06d}.tar", exc) from None
            count += 1
            bar.update(1)
    finally:
        bar.close()
        if writer is not None:
            try:
                writer.close()
                stream.close()
            except WRITE_ERRORS as exc:
                raise write_failed(out / f"{split}-{shard:06d}.tar", exc) from None
    n_shards = shard + 1
    pattern = str(out / f"{split}-{{000000..{max(n_shards - 1, 0):06d}}}.tar") if n_shards > 1 else str(out / f"{split}-000000.tar")
    log.info("wrote %d %s samples in %d shards to %s", count, split, n_shards, out)
    return {"count": count, "shards": n_shards, "pattern": pattern if n_shards else None}
