"""No hidden cost (issue 15, part 3): hardbatch against a plain PyTorch loop on the shapes benchmark.

    python bench/shapes_cost.py [--data DIR] [--epochs 5] [--samplers uniform,rwr] [--seed 0]
                                [--threads 2] [--skip-plain]

Three trainings of the same encoder (``configs/shapes.yaml``: SmallCNN-16, its projector, InfoNCE at
T = 0.2, two ``natural`` views with crops from 0.35 of the area, AdamW at lr 2e-3 with one epoch of
linear warm-up then cosine decay, global batches of 256) for ``--epochs`` epochs on one generated set
(``hardbatch generate shapes``; made in ``--data`` unless it is there), measured in this run:

* the plain loop: one process, ``--threads`` torch threads, uniform batches drawn in the loop, the
  views made in the loop (no data-loader workers); its samples/s is the training time alone (views,
  forward, backward, step), evaluation excluded;
* ``hardbatch run configs/shapes.yaml --set sampler.name=S`` for each ``--samplers`` S: two Train
  workers on local Ray, the feed, the sampler actor and (``rwr``) the graph refresher and its
  embedding pool; samples/s is ``train/samples_per_s`` of its logging windows after the first (plan
  fetch and data wait included, evaluation excluded).

All are scored by the same evaluation (trainers/evaluate.py: weighted cosine kNN, k = 20, on the
encoder's features of the whole training and test sets; the logistic probe).

Targets (issue 15): hardbatch with ``uniform`` reaches the plain loop's kNN accuracy within 0.02
and >= 0.9x its samples/s; ``rwr`` keeps >= 0.9x of ``uniform``'s samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipelines.config import load_config  # noqa: E402
from pipelines.synthetic import image_folder  # noqa: E402
from shapes_floor import _normed, features, load_split  # noqa: E402
from trainers.augment import natural_augment, one_view, to_float  # noqa: E402
from trainers.evaluate import knn_accuracy, linear_probe_accuracy  # noqa: E402
from trainers.loop import lr_at  # noqa: E402
from trainers.losses import LOSSES  # noqa: E402
from trainers.models import build_network, network_spec  # noqa: E402

CONFIG = ROOT / "configs" / "shapes.yaml"


def plain_loop(train, test, config, epochs: int, seed: int) -> dict:
    """The config's encoder, loss, views, optimiser and schedule in one process; kNN after every epoch."""
    torch.manual_seed(seed)
    shape = train[0].shape[1:]
    net = build_network(network_spec("siamese", config.model.model_dump(), shape)).train()
    tc = config.train
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    loss_fn = LOSSES["infonce"](temperature=config.loss.infonce["temperature"])
    augment = natural_augment(shape[1:], crop_min=config.augment.crop_min)
    rng = np.random.default_rng(seed)
    batch = tc.batch_size
    spe = len(train[0]) // batch
    y_train, y_test = torch.from_numpy(train[1]), torch.from_numpy(test[1])
    knn_by_epoch, train_s = [], 0.0
    for epoch in range(epochs):
        order = rng.permutation(len(train[0]))
        t0 = time.perf_counter()
        for step in range(spe):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch + step / spe, tc.lr, tc.warmup_epochs, epochs)
            x = torch.from_numpy(train[0][order[step * batch:(step + 1) * batch]])
            views = to_float(torch.cat([one_view(x, augment), one_view(x, augment)]))
            _, z = net(views)
            loss = loss_fn(*z.chunk(2))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_s += time.perf_counter() - t0
        f_train, f_test = features(net.encoder, train[0]), features(net.encoder, test[0])
        knn_by_epoch.append(knn_accuracy(_normed(f_train), y_train, _normed(f_test), y_test))
        print(f"  plain loop epoch {epoch + 1}: kNN {knn_by_epoch[-1]:.3f}, {spe * batch / train_s * (epoch + 1):.0f} "
              f"samples/s so far", flush=True)
    return {"knn": knn_by_epoch[-1], "best_knn": max(knn_by_epoch), "samples_per_s": epochs * spe * batch / train_s,
            "probe": linear_probe_accuracy(f_train, y_train, f_test, y_test)}


def hardbatch_run(data: Path, work: Path, sampler: str, epochs: int, seed: int) -> dict:
    """One ``hardbatch run`` of the config with ``sampler.name=sampler``; its metrics from metrics.jsonl."""
    name = f"cost-{sampler}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(CONFIG),
           "--set", f"data.source=images:{data / 'train'}", "--set", f"data.test_source=images:{data / 'test'}",
           "--set", f"sampler.name={sampler}", "--set", f"train.epochs={epochs}", "--set", f"train.seed={seed}",
           "--set", f"storage.path={work / 'results'}", "--set", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
           "--set", f"tracking.run_name={name}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"hardbatch run ({sampler}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / "results" / name / "metrics.jsonl").read_text().splitlines()]
    windows = [row["train/samples_per_s"] for row in rows if "train/samples_per_s" in row][1:]
    knn = [row["eval/knn_acc"] for row in rows if "eval/knn_acc" in row]
    probe = [row["eval/linear_acc"] for row in rows if "eval/linear_acc" in row]
    waits = [row["train/data_wait_s"] for row in rows if "train/data_wait_s" in row][1:]
    print(f"  hardbatch {sampler}: kNN by epoch {', '.join(f'{v:.3f}' for v in knn)}; {wall:.0f} s", flush=True)
    return {"knn": knn[-1], "best_knn": max(knn), "probe": probe[-1] if probe else float("nan"),
            "samples_per_s": statistics.median(windows), "wait_s": statistics.median(waits), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/tmp/hardbatch-shapes-10k", help="the generated set (made if missing)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samplers", default="uniform,rwr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="the plain loop's torch threads")
    parser.add_argument("--skip-plain", action="store_true", help="hardbatch's runs only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data).resolve()
    if not (data / "train").is_dir():
        image_folder(data, num_classes=10, per_class={"train": 1000, "test": 200}, size=32, seed=0, kind="shapes")
    config = load_config(CONFIG, [f"data.source=images:{data / 'train'}", f"data.test_source=images:{data / 'test'}"])
    rows: dict[str, dict] = {}
    if not args.skip_plain:
        train, test = load_split(data / "train"), load_split(data / "test")
        print(f"{len(train[0])} training / {len(test[0])} test images; {args.epochs} epochs", flush=True)
        rows["plain loop"] = plain_loop(train, test, config, args.epochs, args.seed)
    with tempfile.TemporaryDirectory(prefix="hardbatch-cost-") as tmp:
        for sampler in args.samplers.split(","):
            rows[f"hardbatch {sampler}"] = hardbatch_run(data, Path(tmp), sampler, args.epochs, args.seed)
    base = rows.get("plain loop") or rows.get("hardbatch uniform")
    print(f"\n{args.epochs} epochs, seed {args.seed}; ratios against "
          f"{'the plain loop' if 'plain loop' in rows else 'hardbatch uniform'}\n")
    print("| training | final kNN | best kNN | probe | samples/s | ratio | data wait s/step |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        wait = f"{row['wait_s']:.3f}" if "wait_s" in row else "-"
        print(f"| {name} | {row['knn']:.3f} | {row['best_knn']:.3f} | {row['probe']:.3f} | "
              f"{row['samples_per_s']:.0f} | {row['samples_per_s'] / base['samples_per_s']:.2f}x | {wait} |")
    if "hardbatch uniform" in rows and "hardbatch rwr" in rows:
        ratio = rows["hardbatch rwr"]["samples_per_s"] / rows["hardbatch uniform"]["samples_per_s"]
        print(f"\nrwr / uniform samples/s: {ratio:.2f}x (target >= 0.90)")
    if "plain loop" in rows and "hardbatch uniform" in rows:
        gap = rows["hardbatch uniform"]["knn"] - rows["plain loop"]["knn"]
        print(f"hardbatch uniform - plain loop, final kNN: {gap:+.3f} (target within 0.02)")


if __name__ == "__main__":
    main()
