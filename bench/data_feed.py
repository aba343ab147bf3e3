"""Feed throughput (decode + augment + collate) against a plain torch DataLoader, same files and transforms.

    python bench/data_feed.py [--quick] [--images N] [--size S] [--batch B] [--workers W] [--rounds R]

Both sides read the same generated image folder (``pipelines.synthetic``; PNG at 32 x 32 by default,
``--format jpg --size 224`` for large JPEGs) and produce the same batches: two views per sample with
the ``natural`` preset (SimCLR's recipe), uint8, ``[B, 3, S, S]`` each, ids in a fixed random order.

* baseline: ``torch.utils.data.DataLoader(num_workers=W, persistent_workers=True, prefetch_factor=4)``
  over a map-style dataset whose ``__getitem__`` reads one file, decodes it (the same decoder) and
  draws its two views; the default collate stacks them.
* hardbatch: ``trainers.feed.Feed`` with W processes and 4 batches of prefetch over a SampleStore of
  the same files (encoded bytes, disk shards memory-mapped as in a run), ids pushed by a plan function
  as the sampler client does.

W defaults to the machine's cores. Rounds alternate baseline / feed so that load from other work on
the machine hits both alike; the ratio is per round, the median is the headline (target >= 0.9x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.store import SampleStore, Shard, shard_table, write_shard
from pipelines.synthetic import image_folder
from trainers.feed import BatchMaker, Feed, _decode_image, fit_square, _transform


class FolderViews(torch.utils.data.Dataset):
    """The baseline's dataset: one file -> decode -> two natural views (uint8)."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size
        self.augment = {"preset": "natural", "size": size, "channels": 3, "blur": False}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        img = fit_square(_decode_image(self.files[i].read_bytes()), self.size)
        transform = _transform(self.augment)
        return transform(img), transform(img)


def _store(files: list[Path], names: list[str], size: int, out: Path, shard: int = 4096) -> SampleStore:
    shards = []
    for a in range(0, len(files), shard):
        b = min(a + shard, len(files))
        path = str(out / f"shard_{a:08d}.arrow")
        write_shard(shard_table(np.arange(a, b), [f.read_bytes() for f in files[a:b]], names[a:b]), path)
        shards.append(Shard(a, b, path=path))
    return SampleStore(shards, None, None, {"kind": "image", "size": size}, location="disk")


def run_baseline(files, size, order, batch, workers, batches) -> float:
    loader = torch.utils.data.DataLoader(FolderViews(files, size), batch_size=batch, sampler=order.tolist(),
                                         num_workers=workers, persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers > 0 else None)
    it = iter(loader)
    next(it)  # start-up and the first batch are not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        a, b = next(it)
        assert a.shape == (batch, 3, size, size) and a.dtype == torch.uint8
    rate = batches * batch / (time.perf_counter() - t0)
    del it, loader
    return rate


def run_feed(store, size, order, batch, workers, batches) -> float:
    maker = BatchMaker(store.codec, views=2, augment={"preset": "natural", "size": size, "channels": 3, "blur": False})
    plans = lambda step, horizon=None: (order[step * batch:(step + 1) * batch], 0)  # noqa: E731
    feed = Feed(store, maker, plans, workers=workers, depth=4, seed=0, say=lambda s: None)
    try:
        feed.next(0, end=batches + 1)
        t0 = time.perf_counter()
        for step in range(1, batches + 1):
            out, _ = feed.next(step, end=batches + 1)
            assert out["views"][0].shape == (batch, 3, size, size)
        return batches * batch / (time.perf_counter() - t0)
    finally:
        feed.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--format", default="png", choices=("png", "jpg"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=None)
    args = parser.parse_args()
    images = 2048 if args.quick else args.images
    batches = args.batches or max(4, min(60, images // args.batch - 2))
    rounds = 1 if args.quick else args.rounds
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        made = image_folder(Path(tmp, "imgs"), num_classes=10, per_class=images // 10, size=args.size,
                            formats=(args.format,), seed=0)
        names = made.files[""]
        files = [Path(tmp, "imgs", n) for n in names]
        (Path(tmp) / "store").mkdir()
        store = _store(files, names, args.size, Path(tmp, "store"))
        order = np.random.default_rng(0).permutation(len(files))
        print(f"images={len(files)} {args.format} {args.size}x{args.size} batch={args.batch} (2 views) "
              f"workers={args.workers} batches/round={batches} cores={os.cpu_count()}", flush=True)
        base, feed = [], []
        for r in range(rounds):
            base.append(run_baseline(files, args.size, order, args.batch, args.workers, batches))
            feed.append(run_feed(store, args.size, order, args.batch, args.workers, batches))
            print(f"round {r + 1}: DataLoader {base[-1]:8.0f} samples/s   Feed {feed[-1]:8.0f} samples/s   "
                  f"ratio {feed[-1] / base[-1]:.2f}", flush=True)
    ratios = [f / b for f, b in zip(feed, base)]
    print(f"{'path':40s} {'samples/s':>10s} {'vs DataLoader':>14s}")
    print(f"{'DataLoader, num_workers=' + str(args.workers) + ' (median)':40s} {statistics.median(base):10.0f} {1.0:14.2f}")
    print(f"{'hardbatch Feed, ' + str(args.workers) + ' processes (median)':40s} {statistics.median(feed):10.0f} "
          f"{statistics.median(ratios):14.2f}")


if __name__ == "__main__":
    main()
