"""Memory of a run on a large image folder: peak RSS of the driver, a train worker, its feed and Ray.

    python bench/data_memory.py [--quick] [--data-dir DIR] [--small N] [--large N] [--minutes M]
                                [--only small|large] [--object-store-mb MB]

Two generated sets (``pipelines.synthetic``, written once under ``--data-dir`` and reused):

* ``small``: N (default 10^6) 32 x 32 PNG images in 10 class folders (a few GB encoded);
* ``large``: N (default 2 * 10^4) 224 x 224 JPEG images in 10 class folders.

Each is trained with ``hardbatch run configs/digits.yaml`` and only ``data.source`` plus sizes changed
(a small CNN, 2 workers, RWR batches, one epoch, no refresh during the measured window), in a
subprocess whose whole process tree (driver, raylet, train workers and their feed processes, the
refresher and its Ray Data pool) is sampled every 2 s from ``/proc``. The run is stopped after
``--minutes`` of training (or when it ends). Reported per process kind: peak RSS, split into
anonymous memory (the process's own heap: what the memory model bounds), file-backed pages (the
memory-mapped disk shards, in the shared and reclaimable page cache) and shared memory (the Ray
object store pages the process touched). The baseline each figure is compared with is what the old
data path needed: the decoded float32 of the dataset, ``N x 3 x S x S x 4`` bytes, in every process
that gathered batches.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KB = 1024


def _status(pid: int, detail: bool = False) -> dict[str, int]:
    """kB figures of a process: RSS and its parts from ``status``; with ``detail`` the proportional
    set sizes from ``smaps_rollup`` (a page shared by n processes counts 1/n in each: forked feed
    processes share their parent's pages until written)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "PPid"):
                out[key] = int(value.split()[0])
        if detail:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
                key, _, value = line.partition(":")
                if key in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _tree(root: int) -> dict[int, tuple[int, str]]:
    """pid -> (ppid, cmdline) of ``root`` and all its descendants."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _status(int(entry))
            if "PPid" in st:
                parents[int(entry)] = st["PPid"]
    members, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in members:
                members.add(pid)
                frontier.append(pid)
    return {pid: (parents.get(pid, 0), _cmdline(pid)) for pid in members}


def _kind(pid: int, root: int, tree: dict[int, tuple[int, str]]) -> str:
    ppid, cmd = tree[pid]
    if pid == root:
        return "driver"
    if "TrainWorker" in cmd:
        parent_cmd = tree.get(ppid, (0, ""))[1]
        return "feed process" if "TrainWorker" in parent_cmd else "train worker"
    for key, name in (("raylet", "raylet"), ("gcs_server", "gcs_server"), ("GraphRefresher", "refresher"),
                      ("MapBatches", "Ray Data actor"), ("MapWorker", "Ray Data actor"), ("SamplerActor", "sampler"),
                      ("TrainController", "train controller")):
        if key in cmd:
            return name
    return "other Ray processes"


class Sampler:
    def __init__(self, root: int):
        self.root = root
        self.peak: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.total_peak = 0

    def sample(self) -> None:
        tree = _tree(self.root)
        total = 0
        for pid in tree:
            st = _status(pid, detail=True)
            if not st:
                continue
            kind = _kind(pid, self.root, tree)
            peak = self.peak[kind]
            for key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Pss_Anon", "Pss_Shmem"):
                peak[key] = max(peak[key], st.get(key, 0))
            total += st.get("Pss_Anon", st.get("RssAnon", 0))
        self.total_peak = max(self.total_peak, total)


def ensure_images(path: Path, count: int, size: int, fmt: str) -> float:
    """Generate the set once (a marker file records its parameters); returns the seconds it took (0: reused)."""
    from pipelines.synthetic import image_folder

    marker = path / ".generated.json"
    want = {"count": count, "size": size, "format": fmt}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return 0.0
    t0 = time.perf_counter()
    image_folder(path, num_classes=10, per_class=count // 10, size=size, formats=(fmt,), seed=0)
    marker.write_text(json.dumps(want))
    return time.perf_counter() - t0


def run_case(name: str, data: Path, overrides: list[str], minutes: float, work: Path) -> dict:
    out_dir = work / name
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs/digits.yaml"),
           "--set", f"data.source=images:{data}", "--set", f"storage.path={out_dir / 'results'}",
           "--set", f"tracking.uri=sqlite:///{out_dir / 'mlflow.db'}", "--set", f"tracking.run_name={name}",
           *[a for o in overrides for a in ("--set", o)]]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    log = open(out_dir / "run.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=out_dir)
    sampler = Sampler(proc.pid)
    metrics_path = out_dir / "results" / name / "metrics.jsonl"
    train_start = None
    while proc.poll() is None:
        sampler.sample()
        if train_start is None and metrics_path.exists() and "train/loss" in metrics_path.read_text():
            train_start = time.perf_counter()
        if train_start is not None and time.perf_counter() - train_start > minutes * 60:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(2.0)
    wall = time.perf_counter() - t0
    try:  # the run's local Ray must not outlive it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log.close()
    text = (out_dir / "run.log").read_text(errors="replace")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    flat = [r.get("metrics", r) for r in rows]
    train = [m for m in flat if isinstance(m, dict) and "train/loss" in m]
    build = next((m["data/store_build_seconds"] for m in flat if isinstance(m, dict) and "data/store_build_seconds" in m), None)
    steps = max((r.get("step", 0) for r in rows if "train/loss" in r.get("metrics", r)), default=0)
    return {"name": name, "wall_s": wall, "returncode": proc.returncode, "peak": sampler.peak,
            "total_anon_peak_kb": sampler.total_peak, "build_s": build, "steps": steps,
            "samples_per_s": [m["train/samples_per_s"] for m in train][-5:],
            "data_wait_s": [m["train/data_wait_s"] for m in train][-5:],
            "data_line": next((line for line in text.splitlines() if "] data: images:" in line), ""),
            "graph_line": next((line for line in text.splitlines() if "] graph v0:" in line), "")}


def report(result: dict, count: int, side: int) -> None:
    naive = count * 3 * side * side * 4
    print(f"\n== {result['name']}: {count} images, decoded 3x{side}x{side}; {result['data_line'].split('] ')[-1]}")
    print(f"   {result['graph_line'].split('] ')[-1]}; store build {result['build_s']:.0f} s "
          f"= {result['build_s'] / count * 1e5:.0f} s per 10^5 images" if result["build_s"] else "   (no build time)")
    print(f"   trained {result['steps']} steps; last samples/s {[round(v) for v in result['samples_per_s']]}, "
          f"data wait s {[round(v, 3) for v in result['data_wait_s']]}; wall {result['wall_s']:.0f} s, rc {result['returncode']}")
    print(f"   {'process':22s} {'peak RSS MiB':>12s} {'anon':>8s} {'file (mmap)':>11s} {'shm (obj store)':>15s} "
          f"{'PSS anon':>9s} {'anon vs decoded float32':>24s}")
    for kind in ("driver", "train worker", "feed process", "refresher", "Ray Data actor", "raylet", "gcs_server",
                 "sampler", "train controller", "other Ray processes"):
        peak = result["peak"].get(kind)
        if not peak:
            continue
        mib = lambda kb: kb * KB / 2**20  # noqa: E731
        print(f"   {kind:22s} {mib(peak['VmRSS']):12.0f} {mib(peak['RssAnon']):8.0f} {mib(peak['RssFile']):11.0f} "
              f"{mib(peak['RssShmem']):15.0f} {mib(peak['Pss_Anon']):9.0f} {peak['RssAnon'] * KB / naive:24.3f}")
    print(f"   all processes together, anonymous (PSS): {result['total_anon_peak_kb'] * KB / 2**30:.2f} GiB peak; "
          f"the decoded float32 of the set would be {naive / 2**30:.1f} GiB per process holding it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^4 small and 10^3 large images, 1 minute each")
    parser.add_argument("--data-dir", default=None, help="where the generated sets live (default: a temporary dir)")
    parser.add_argument("--small", type=int, default=1_000_000)
    parser.add_argument("--large", type=int, default=20_000)
    parser.add_argument("--minutes", type=float, default=4.0, help="training minutes measured per set")
    parser.add_argument("--only", choices=("small", "large"), default=None)
    parser.add_argument("--object-store-mb", type=int, default=None, help="ray.object_store_mb of the runs")
    args = parser.parse_args()
    small, large = (10_000, 1_000) if args.quick else (args.small, args.large)
    minutes = 1.0 if args.quick else args.minutes
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir or tmp)
        common = ["model.width=8", "model.embed_dim=64", "model.proj_hidden=128", "model.proj_dim=32",
                  "train.epochs=1", "refresh.every_epochs=0", "train.log_every_steps=10", "eval.max_samples=2000",
                  "eval.max_train_samples=5000", "sampler.m=100"]
        if args.object_store_mb:
            common.append(f"ray.object_store_mb={args.object_store_mb}")
        cases = {"small": (small, 32, "png", ["train.batch_size=256", "refresh.batch_size=1024"]),
                 "large": (large, 224, "jpg", ["train.batch_size=64", "refresh.batch_size=128"])}
        for name, (count, side, fmt, extra) in cases.items():
            if args.only and name != args.only:
                continue
            folder = data_dir / f"{name}_{count}_{side}_{fmt}"
            gen = ensure_images(folder, count, side, fmt)
            print(f"{name}: {count} {fmt} images of {side}x{side} under {folder} "
                  f"({'generated in %.0f s' % gen if gen else 'reused'})", flush=True)
            result = run_case(name, folder, common + extra, minutes, Path(tmp))
            report(result, count, side)


if __name__ == "__main__":
    main()
