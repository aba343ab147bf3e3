"""Stage 3 of bench/gpu_check.sh: a short ``hardbatch run`` on the GPU, and what it measured.

resnet18 (CIFAR stem) on generated 32x32 images (:mod:`pipelines.synthetic`, 10 classes), bf16
autocast with channels_last, one Train worker on one GPU, RWR batches from a graph refreshed every
epoch by an embedding actor that shares the training GPU (``refresh.num_gpus=0.25``). Prints the
training samples/s per epoch, the peak GPU memory and the refresh times read back from the run's
``metrics.jsonl``.

    python bench/gpu_job.py [--images 4096] [--epochs 3] [--batch 256] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096, help="training images (plus a quarter held out)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--cpu", action="store_true", help="a dry run of this script without a GPU (fp32 on the CPU)")
    args = parser.parse_args()
    from pipelines.synthetic import image_folder

    work = Path(tempfile.mkdtemp(prefix="hb_gpu_"))
    per_class = {"train": args.images // 10, "test": max(args.images // 40, 10)}
    t0 = time.perf_counter()
    image_folder(work / "shapes", num_classes=10, per_class=per_class, size=32)
    print(f"generated {10 * sum(per_class.values())} images in {time.perf_counter() - t0:.1f} s")
    overrides = [
        f"data.source=images:{work / 'shapes' / 'train'}", f"data.test_source=images:{work / 'shapes' / 'test'}",
        "data.image_size=32", "model.backbone=resnet18", "train.precision=bf16", "train.channels_last=true",
        "train.use_gpu=true", "train.num_workers=1", f"train.batch_size={args.batch}", f"train.epochs={args.epochs}",
        "train.warmup_epochs=0", "sampler.name=rwr", "refresh.every_epochs=1", "refresh.num_gpus=0.25",
        "refresh.num_cpus=1", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"storage.path={work / 'results'}",
        "tracking.run_name=gpu-check", "data.feed_workers=4",
    ]
    if args.cpu:
        gpu_only = ("train.precision", "train.use_gpu", "refresh.num_gpus", "refresh.num_cpus", "data.feed_workers",
                    "train.num_workers")
        overrides = [o for o in overrides if not o.startswith(gpu_only)] + ["train.num_workers=1", "refresh.num_cpus=0.5"]
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs" / "digits.yaml")]
    for item in overrides:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(done.stdout[-6000:])
    print(f"hardbatch run: exit {done.returncode} after {time.perf_counter() - t0:.0f} s")
    metrics_file = work / "results" / "gpu-check" / "metrics.jsonl"
    if not metrics_file.exists():
        print(f"no {metrics_file}")
        return 1
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]

    def values(key: str) -> list[float]:
        return [row[key] for row in rows if key in row]

    speeds = values("train/samples_per_s")
    print("train/samples_per_s (logging windows):", " ".join(f"{v:.0f}" for v in speeds))
    print("gpu/max_memory_mb per epoch:", " ".join(f"{v:.0f}" for v in values("gpu/max_memory_mb")))
    for key in ("refresh/embed_seconds", "refresh/graph_seconds", "refresh/stall_seconds", "eval/knn_acc"):
        print(f"{key}:", " ".join(f"{v:.3f}" for v in values(key)))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
