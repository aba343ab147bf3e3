"""Training samples/s of ``hardbatch run`` against a plain PyTorch loop: same model, views, batch, optimiser.

    python bench/train_throughput.py [--quick] [--backbone resnet18] [--size 32] [--batch 64] [--steps 30]
                                     [--threads 2] [--precision fp32] [--skip-other-precision]

Both sides train the same network (default: resnet18 with the CIFAR stem, at 32 x 32) with InfoNCE on
two ``natural`` views (SimCLR's recipe) of generated images (``pipelines.synthetic``), AdamW, uniform
batches of ``--batch`` samples, ``--threads`` torch threads for the compute:

* baseline: one Python process, ``torch.utils.data.DataLoader`` (one worker process) reading the files
  and drawing the views, forward, loss, backward, step. Samples/s over ``--steps`` steps after two
  warm-up steps.
* hardbatch: ``hardbatch run`` on the same folder with one Train worker of ``--threads`` CPUs,
  ``sampler.name=uniform``, one feed process, no graph refresh; its samples/s is
  ``train/samples_per_s`` from the run's ``metrics.jsonl`` over its full logging windows after the first
  (the first holds the start-up; evaluation is excluded: it is the time between steps, plan fetch and
  data wait included), as total samples over total time. While it
  trains, the CPU of every process of the run is sampled from ``/proc``: the line "CPU while training"
  says how many cores the Train worker got and how much Ray's own processes took (on a 2-core machine,
  about 0.15 of a core: enough to cost the worker's two compute threads about 10 %).

The plain loop is also timed in the other precision, bf16 (autocast) against fp32 (a report; no target;
``--skip-other-precision`` leaves it out).
Targets (issue 13): hardbatch >= 0.9x the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.synthetic import image_folder  # noqa: E402
from trainers.augment import to_float  # noqa: E402
from trainers.losses import LOSSES  # noqa: E402
from trainers.models import build_network, network_spec  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from data_feed import FolderViews  # noqa: E402  (the DataLoader side of bench/data_feed.py)


def plain_loop(files: list[Path], size: int, model_cfg: dict, batch: int, steps: int, precision: str,
               seed: int = 0) -> float:
    """Samples/s of a plain single-process training loop over ``steps`` steps (after 2 warm-up steps)."""
    torch.manual_seed(seed)
    net = build_network(network_spec("siamese", model_cfg, (3, size, size))).train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = LOSSES["infonce"]()
    order = np.random.default_rng(seed).permutation(len(files))
    order = np.resize(order, (steps + 2) * batch)
    loader = torch.utils.data.DataLoader(FolderViews(files, size), batch_size=batch, sampler=order.tolist(),
                                         num_workers=1, persistent_workers=True, prefetch_factor=4, drop_last=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    t0 = None
    for step, (a, b) in enumerate(loader):
        if step == 2:
            t0 = time.perf_counter()
        with autocast:
            _, z = net(torch.cat([to_float(a), to_float(b)]))
        z_a, z_b = z.float().chunk(2)
        loss = loss_fn(z_a, z_b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


class CpuWatch:
    """Samples the CPU time of every process of a run (the driver, the Ray it starts, the Train worker and
    its feed process) every ``period`` s, to say where the machine's CPU goes while the worker trains:
    the worker's share against Ray's own processes (raylet, GCS, dashboard, the Train controller, idle
    actors), which take cores from the worker's compute threads. Linux only (``/proc``); else silent."""

    def __init__(self, root: int, period: float = 1.0):
        self.root, self.period = root, period
        self.samples: list[tuple[float, dict[int, tuple[str, int, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if Path("/proc/self/stat").exists():
            self._thread.start()

    @staticmethod
    def _stat(pid: int):
        raw = Path(f"/proc/{pid}/stat").read_text()
        fields = raw.rsplit(")", 1)[1].split()
        return raw[raw.index("(") + 1:raw.rindex(")")], int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[16])

    def _tree(self) -> dict[int, tuple[str, int, int]]:
        stats = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stats[int(entry.name)] = self._stat(int(entry.name))
                except (OSError, ValueError, IndexError):
                    pass
        kids: dict[int, list[int]] = {}
        for pid, (_, ppid, _, _) in stats.items():
            kids.setdefault(ppid, []).append(pid)
        out, todo = {}, [self.root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                name, _, ticks, nice = stats[pid]
                out[pid] = (name, ticks, nice)
            todo += kids.get(pid, [])
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append((time.perf_counter(), self._tree()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def report(self) -> None:
        """Over the samples where the Train worker uses more than 1.2 cores (training, not start-up or
        evaluation): each process's cores, the worker's own and all others'."""
        hz = os.sysconf("SC_CLK_TCK")
        spans: dict[int, list[float]] = {}
        names: dict[int, tuple[str, int]] = {}
        training = 0.0
        for (t0, a), (t1, b) in zip(self.samples, self.samples[1:]):
            rates = {pid: (b[pid][1] - a[pid][1]) / hz / (t1 - t0) for pid in b if pid in a}
            worker = [pid for pid in rates if b[pid][0].startswith("ray::RayTrainWo") and rates[pid] > 1.2]
            if not worker:
                continue
            training += t1 - t0
            for pid, rate in rates.items():
                spans.setdefault(pid, []).append(rate * (t1 - t0))
                names[pid] = (b[pid][0], b[pid][2])
        if training < 5:
            return
        shares = sorted(((sum(v) / training, pid) for pid, v in spans.items()), reverse=True)
        trainer = sum(share for share, pid in shares if names[pid][0].startswith("ray::RayTrainWo"))
        others = sum(share for share, pid in shares if not names[pid][0].startswith("ray::RayTrainWo"))
        top = ", ".join(f"{names[pid][0]} {share * 100:.1f}" for share, pid in shares
                        if not names[pid][0].startswith("ray::RayTrainWo") and share >= 0.004)
        print(f"hardbatch: CPU while training ({training:.0f} s): Train worker and its feed {trainer:.2f} cores "
              f"(nice {max(n for name, n in names.values() if name.startswith('ray::RayTrainWo'))}), the run's other processes {others:.2f} cores "
              f"(% of a core: {top})", flush=True)


def hardbatch_run(root: Path, work: Path, args: argparse.Namespace, log_every: int) -> list[float]:
    """``train/samples_per_s`` of the full logging windows (``log_every`` steps) after the first of a
    ``hardbatch run``."""
    overrides = [
        f"data.source=images:{root}", f"data.image_size={args.size}", "data.test_fraction=0.05",
        f"model.backbone={args.backbone}", f"train.batch_size={args.batch}", "train.num_workers=1",
        f"train.cpus_per_worker={args.threads}", "refresh.num_cpus=0", "data.feed_workers=1",
        "sampler.name=uniform", "refresh.every_epochs=0", "train.epochs=1", "train.warmup_epochs=0",
        f"train.precision={args.precision}", f"train.log_every_steps={log_every}",
        "eval.max_samples=64", "eval.max_train_samples=256", f"ray.num_cpus={args.threads}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"storage.path={work / 'results'}",
        "tracking.run_name=throughput", "checkpoint.keep=1",
    ]
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs" / "digits.yaml")]
    for item in overrides:
        cmd += ["--set", item]
    with subprocess.Popen(cmd, cwd=work, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}) as proc:
        watch = CpuWatch(proc.pid)
        try:
            output, _ = proc.communicate(timeout=1800)
        finally:
            watch.stop()
    if proc.returncode != 0:
        raise SystemExit(f"hardbatch run failed:\n{output[-4000:]}")
    watch.report()
    rows = [json.loads(line) for line in (work / "results" / "throughput" / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "train/samples_per_s" in row]
    # the first window holds the start-up; the epoch's last may be a short remainder (noisy): both dropped
    windows = [row for prev, row in zip(logged, logged[1:]) if row["step"] - prev["step"] == log_every]
    waits = [row["train/data_wait_s"] for row in windows]
    print(f"hardbatch: waiting for the batch (plan fetch + feed) per step: "
          f"{' '.join(f'{w * 1000:.0f}' for w in waits)} ms", flush=True)
    return [row["train/samples_per_s"] for row in windows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small_cnn, 10 steps: a check that the script runs")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--skip-other-precision", action="store_true",
                        help="do not time the plain loop in the other precision (bf16 on a CPU without AMX "
                             "or AVX-512 BF16 runs at under 0.3x of fp32 and takes many minutes)")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.steps = "small_cnn", 10
    torch.set_num_threads(args.threads)
    model_cfg = {"backbone": args.backbone}
    images = (args.steps + 2) * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        made = image_folder(Path(tmp, "imgs"), num_classes=10, per_class=-(-images // 10), size=args.size, seed=0)
        files = [Path(tmp, "imgs", name) for name in made.files[""]]
        print(f"{args.backbone} at {args.size}x{args.size}, batch {args.batch} (2 views), {args.steps} steps, "
              f"{args.threads} threads, {len(files)} images, cores={os.cpu_count()}", flush=True)
        base = plain_loop(files, args.size, model_cfg, args.batch, args.steps, args.precision)
        print(f"plain loop ({args.precision}): {base:.1f} samples/s", flush=True)
        other = "bf16" if args.precision == "fp32" else "fp32"
        alt = None
        if not args.skip_other_precision:
            alt = plain_loop(files, args.size, model_cfg, args.batch, args.steps, other)
            print(f"plain loop ({other}): {alt:.1f} samples/s", flush=True)
        work = Path(tmp, "run")
        work.mkdir()
        t0 = time.perf_counter()
        steps_per_epoch = int(len(files) * 0.95) // args.batch
        speeds = hardbatch_run(Path(tmp, "imgs"), work, args, log_every=max(2, steps_per_epoch // 5))
        ours = len(speeds) / sum(1.0 / s for s in speeds)  # equal windows: steps over total time
        print(f"hardbatch run ({args.precision}): windows {' '.join(f'{s:.1f}' for s in speeds)} samples/s "
              f"({time.perf_counter() - t0:.0f} s with Ray start-up)", flush=True)
    print(f"{'path':42s} {'samples/s':>10s} {'ratio':>7s}")
    print(f"{'plain PyTorch loop, ' + args.precision:42s} {base:10.1f} {1.0:7.2f}")
    if alt is not None:
        print(f"{'plain PyTorch loop, ' + other:42s} {alt:10.1f} {alt / base:7.2f}")
    print(f"{'hardbatch run, uniform, ' + args.precision + ' (full windows)':42s} {ours:10.1f} {ours / base:7.2f}"
          f"   target >= 0.90: {'met' if ours / base >= 0.9 else 'MISSED'}")


if __name__ == "__main__":
    main()
