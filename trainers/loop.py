"""The Ray Train worker loop: graph-sampled batches -> the task's step (:mod:`trainers.tasks`) -> loss.

The driver (:mod:`pipelines.run`) does all the arithmetic and hands this function one plain dict
(:func:`train_loop_per_worker`'s ``cfg``). Every rank takes exactly ``steps_per_epoch`` steps per
epoch (``ray.train.report`` is a barrier), each on its own row of the global batch plan served by the
sampler actor.

Numbered comments mark the Ray steps: (1) prepare, (2) resume, (3) feed, (4) report and checkpoint,
(5) refresh the graph (at snapshot and activation steps fixed in advance: :mod:`samplers.protocol`,
:class:`_RefreshCaller`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from samplers.actor import SamplerClient
from samplers.protocol import RefreshSchedule
from trainers.device import Stepper, mean_across_ranks, prepare_network
from trainers.feed import Feed, step_seed
from trainers.losses import LOSSES
from trainers.models import NETWORK_FILE, load_weights, save_network, save_weights
from trainers.progress import ProgressPoster, quiet_logging
from trainers.tasks import build_task
from trainers.tracking import RunTracker

MODEL_FILE = "model.pt"  # the file pipelines.embed loads
# Fault injection for the end-to-end tests: "RANK:STEP:MARKER" makes that rank's process die at the
# start of that global step, once per marker file (the file is created just before).
FAULT_ENV = "HARDBATCH_FAULT_ONCE"
# Pacing for the end-to-end tests: the least time in seconds a step takes (a faster step sleeps the
# rest), so that a run of few steps still spans a fault of fixed length (an MLflow outage of 30 s) on a
# fast machine and costs nothing more on a slow one. Time only: a run's batches, views and weights
# depend on (seed, config) alone, so a paced run trains exactly as an unpaced one.
PACE_ENV = "HARDBATCH_STEP_PACE_S"
OPTIM_FILE = "optimizer.pt"
TRACKER_CLOSE_S = 20.0  # at the end of training, how long rank 0 waits for MLflow to take its last metrics
META_FILE = "meta.json"


class CheckpointWriteError(RuntimeError):
    """Rank 0 could not persist an epoch's checkpoint to the run's storage (full, read-only, a file in
    the way). The run stops; the checkpoints already registered stay valid and resume it. Carries its
    message only, so it pickles from the worker to the driver as is."""


def lr_at(progress_epochs: float, base_lr: float, warmup_epochs: float, total_epochs: float) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to 0; a pure function of the fractional epoch."""
    if warmup_epochs > 0 and progress_epochs < warmup_epochs:
        return base_lr * progress_epochs / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-8)
    done = min(max(progress_epochs - warmup_epochs, 0.0) / span, 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * done))


class _RefreshCaller:
    """Rank 0's side of the refresh protocol (:mod:`samplers.protocol`): at a snapshot step, save the
    weights and ask the refresher for a version active from the step the schedule fixes; at an
    activation step, wait for that version; after other steps, collect a refresh that landed.

    At most one refresh is in flight: one still running at the next snapshot step is waited for
    first (only when ``refresh.lag_steps`` exceeds the period). ``sync`` mode is the special case
    lag 0: the trainer waits for the whole refresh at its snapshot step (the paper's protocol).

    ``refresh/stall_seconds``, logged once per refresh when its result is collected, is the time the
    trainer spent on that refresh instead of training: saving its weight snapshot plus every second
    blocked waiting for it. The wait for a refresh still in flight when training ends is logged as
    ``refresh/teardown_wait_seconds`` instead (no training is left to stall). A version refused as
    stale (started by an earlier attempt of the run) counts in ``refresh/discarded``.
    """

    def __init__(self, refresher, store, schedule: RefreshSchedule, snapshot_root: str, tracker: RunTracker,
                 poster: Optional[ProgressPoster] = None):
        self.refresher = refresher
        self.store = store  # the training split, sent with every refresh
        self.poster = poster or ProgressPoster(None)
        self.schedule = schedule
        self.snapshot_root = Path(snapshot_root)
        self.tracker = tracker
        self.attempt: Optional[int] = None  # the run's attempt (the sampler's, after its rewind)
        self.pending: Optional[ray.ObjectRef] = None
        self.pending_overhead = 0.0  # seconds the pending refresh already cost the trainer
        self.pending_snapshot: Optional[Path] = None  # its weights, deleted once it has landed
        self.pending_since = 0  # the first step whose plans it may ask for (scope: seen)
        self.pending_boundary = 0
        self.last_boundary = 0
        self.discarded = 0

    def snapshot_dir(self, boundary: int) -> Path:
        return self.snapshot_root / f"step_{boundary:07d}"

    def trigger(self, source, boundary: int) -> None:
        """Start the refresh snapshotted at ``boundary`` from ``source``: the model (its weights are saved
        first), or a directory already holding them (a snapshot that survived a crash)."""
        self.finish(block=True, step=boundary)  # at most one refresh in flight
        t0 = time.perf_counter()
        if isinstance(source, (str, Path)):
            snapshot = Path(source)
        else:
            snapshot = self.snapshot_dir(boundary)
            snapshot.mkdir(parents=True, exist_ok=True)
            save_weights(source, snapshot / MODEL_FILE)
        since = self.schedule.last_boundary(boundary - 1)  # scope: seen re-embeds the plans since then
        self.pending = self.refresher.refresh.remote(self.store, str(snapshot), self.schedule.activation(boundary),
                                                     boundary, since, self.attempt)
        self.pending_snapshot, self.pending_since, self.pending_boundary = snapshot, since, boundary
        self.pending_overhead = time.perf_counter() - t0
        self.last_boundary = boundary
        if self.schedule.mode == "sync":
            self.finish(block=True, step=boundary)

    def poll(self, step: int) -> None:
        """After a step: collect a refresh that landed (its metrics and console line), without waiting."""
        self.finish(block=False, step=step)

    def finish(self, block: bool, step: int, teardown: bool = False, timeout_s: Optional[float] = None) -> float:
        """Collect and log a finished refresh, waiting for it when ``block`` (at most ``timeout_s``).

        A refresh not done after ``timeout_s`` (at the end of training: one that never got its
        resources) is abandoned with a warning and ``refresh/abandoned``; the run's end then stops its
        actors.

        Returns:
            The seconds the trainer lost to that refresh (0.0 when none was collected).
        """
        if self.pending is None:
            return 0.0
        t0 = time.perf_counter()
        if not block and not ray.wait([self.pending], timeout=0)[0]:
            return 0.0
        if timeout_s is not None and not ray.wait([self.pending], timeout=timeout_s)[0]:
            message = (f"the graph refresh started at step {self.pending_boundary} was still running {timeout_s:g} s "
                       f"after training ended (refresh.final_wait_s); abandoned: it has no resources or is slow, and "
                       f"its graph would only have been kept on disk")
            self.poster.post("warning", message=message)
            self.tracker.log_metrics({"refresh/abandoned": 1}, step=step)
            self._drop_pending()
            return 0.0
        info = ray.get(self.pending)
        waited = time.perf_counter() - t0
        self._drop_pending()  # the graph is built: nothing needs its weight snapshot any more
        if info.get("discarded"):  # started by an earlier attempt (only after a restart)
            self.discarded += 1
            self.tracker.log_metrics({"refresh/discarded": self.discarded}, step=step)
            return 0.0
        metrics = _refresh_metrics(info)
        if teardown:
            metrics.update({"refresh/stall_seconds": self.pending_overhead,
                            "refresh/teardown_wait_seconds": waited})
        else:
            metrics["refresh/stall_seconds"] = self.pending_overhead + waited
        self.tracker.log_metrics(metrics, step=step)
        self.poster.post("refresh", version=info["version"], activate_step=info["activate_step"],
                         embed_seconds=info["embed_seconds"], graph_seconds=info["graph_seconds"],
                         stall_seconds=None if teardown else metrics["refresh/stall_seconds"])
        if info.get("manifest"):
            self.tracker.log_artifact(info["manifest"], "graphs")
        return metrics["refresh/stall_seconds"]

    def _drop_pending(self) -> None:
        self.pending = None
        if self.pending_snapshot is not None:
            shutil.rmtree(self.pending_snapshot, ignore_errors=True)
            self.pending_snapshot = None

    def plan_floor(self) -> int:
        """The first step whose plans a refresh may still ask for (``scope: seen`` re-embeds the ids
        of the plans since the previous snapshot step): the pending refresh's, else the next one's."""
        return self.pending_since if self.pending is not None else self.last_boundary

    def restart(self, model: torch.nn.Module, resume_step: int, kept: list[dict[str, Any]]) -> None:
        """After a (re)start at ``resume_step``: start again each refresh the schedule still needs whose
        version did not land before (:meth:`RefreshSchedule.to_restart`), from its surviving weight
        snapshot, else from the checkpoint's weights when it was snapshotted at ``resume_step``."""
        self.last_boundary = self.schedule.last_boundary(resume_step)
        landed = {int(v.get("snapshot_step", v["activate_step"])) for v in kept}
        for boundary in self.schedule.to_restart(resume_step, landed):
            saved = self.snapshot_dir(boundary)
            if (saved / MODEL_FILE).exists():
                self.trigger(saved, boundary)
                continue
            if boundary != resume_step:
                self.poster.post("warning", message=(
                    f"the weights of step {boundary} (graph refresh snapshot) are gone; its graph is rebuilt from "
                    f"the checkpoint of step {resume_step}, so from step {self.schedule.activation(boundary)} on "
                    f"batches may differ from an uninterrupted run's"))
            self.trigger(model, boundary)


# The metric a run's best encoder is chosen by: the first of these the task reports (higher is better).
BEST_BY = ("eval/accuracy", "eval/retrieval_acc", "eval/knn_acc")


class BestEncoder:
    """Rank 0 keeps the weights of the best epoch so far in ``best_dir`` (``model.pt`` and
    ``meta.json``: epoch, step, metric, value), whatever checkpoints are deleted. The value is read
    back on a restart, so a resumed run keeps comparing against the best of the earlier attempts."""

    def __init__(self, best_dir: str, spec: Optional[dict[str, Any]] = None):
        self.dir = Path(best_dir)
        self.spec = spec  # the network spec, written beside the weights when given
        meta = self.dir / META_FILE
        self.value = json.loads(meta.read_text())["value"] if meta.exists() else -math.inf

    def offer(self, model: torch.nn.Module, metrics: dict[str, Any], epoch: int, step: int) -> bool:
        """Keep ``model`` if its monitored metric beats the best so far; True when it did."""
        key = next((k for k in BEST_BY if k in metrics), None)
        if key is None or not math.isfinite(float(metrics[key])) or float(metrics[key]) <= self.value:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        save_weights(model, self.dir / (MODEL_FILE + ".tmp"))
        os.replace(self.dir / (MODEL_FILE + ".tmp"), self.dir / MODEL_FILE)
        if self.spec is not None:
            (self.dir / NETWORK_FILE).write_text(json.dumps(self.spec, indent=1))
        (self.dir / (META_FILE + ".tmp")).write_text(json.dumps(
            {"epoch": epoch, "step": step, "metric": key, "value": float(metrics[key])}))
        os.replace(self.dir / (META_FILE + ".tmp"), self.dir / META_FILE)  # written last: the commit
        self.value = float(metrics[key])
        return True


def _delete_version_files(entries: list[dict[str, Any]]) -> list[str]:
    """Delete the graph tables and embeddings of these version entries (``path``: the table); returns
    the deleted files."""
    deleted = []
    for entry in entries:
        graph = Path(entry["path"])
        for path in (graph, graph.with_name(graph.stem + "_embeddings.npy")):
            if path.exists():
                path.unlink()
                deleted.append(str(path))
    return deleted


def prune_graph_versions(sampler, floor: int) -> list[str]:
    """Forget, in the sampler actor, the graph versions no step >= ``floor`` uses and delete their
    tables and embeddings (their JSON manifests stay: they are small and logged to MLflow); returns
    the deleted files."""
    return _delete_version_files(ray.get(sampler.prune.remote(floor)))


def retention_floor(epoch: int, steps_per_epoch: int, keep: Optional[int], refresh_floor: Optional[int]) -> int:
    """The first step whose plans may still be needed after epoch ``epoch``'s checkpoint is reported.

    Ray Train keeps the newest ``keep`` checkpoints (epochs ``epoch - keep + 1 .. epoch``, at steps
    ``(epoch - keep + 2) * spe ..``); one epoch more is kept in reserve, for a restart that comes
    before the controller has registered the newest report (it then resumes from the one before).
    ``refresh_floor``: what a refresh may still ask for (:meth:`_RefreshCaller.plan_floor`).
    ``keep=None`` keeps everything (floor 0).
    """
    if keep is None:
        return 0
    floor = max(0, (epoch + 1 - keep) * steps_per_epoch)
    return floor if refresh_floor is None else min(floor, refresh_floor)


def _maybe_fail(rank: int, step: int) -> None:
    """Die like a crashed worker when :data:`FAULT_ENV` names this rank and step (tests only)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault_rank, fault_step, marker = spec.split(":", 2)
    if int(fault_rank) == rank and int(fault_step) == step and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    quiet_logging()
    conf = cfg["config"]
    train_cfg, sampler_cfg, refresh_cfg = conf["train"], conf["sampler"], conf["refresh"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spe, epochs = cfg["steps_per_epoch"], train_cfg["epochs"]
    train_store, test_store = cfg["train_store"], cfg["test_store"]

    # (1) prepare: same initial weights everywhere (DDP also broadcasts rank 0's), gloo/NCCL DDP.
    torch.manual_seed(train_cfg["seed"])
    loss_fn = LOSSES[conf["loss"]["name"]](**cfg["loss_kwargs"])
    data_cfg = cfg.get("data") or {}
    task = build_task(cfg["network"], loss_fn, cfg.get("loss_options"), conf["eval"], data_cfg.get("augment"),
                      precision=train_cfg.get("precision", "fp32"), channels_last=train_cfg.get("channels_last", False))
    device = ray.train.torch.get_device()  # the GPU Ray Train gave this worker, or the CPU
    model = prepare_network(task, train_cfg, ray.train.torch.prepare_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    stepper = Stepper(optimizer, train_cfg.get("precision", "fp32"), device)
    loss_fn.to(device)
    task.attach(model)

    # (2) resume from the latest reported checkpoint after a worker-group restart.
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            load_weights(model, Path(ckpt_dir, MODEL_FILE))
            optimizer.load_state_dict(torch.load(Path(ckpt_dir, OPTIM_FILE), map_location=device, weights_only=True))
            stepper.load(Path(ckpt_dir))
            task.load_state(Path(ckpt_dir))
            start_epoch = json.loads(Path(ckpt_dir, META_FILE).read_text())["epoch"] + 1

    sampler = ray.get_actor(cfg["sampler_name"])
    if cfg.get("graph_v0") is not None:
        ray.get(cfg["graph_v0"])  # graph version 0 is built while the workers start; plans need it
    rewound = None
    if rank == 0:  # every (re)start is a new attempt: replay from its step with the versions made before it
        rewound = ray.get(sampler.rewind.remote(start_epoch * spe))
        _delete_version_files(rewound["dropped"])
    _barrier()
    client = SamplerClient(sampler, rank, prefetch=sampler_cfg["prefetch"])
    # (3) feed: decode + augment of the next batches in parallel processes, ahead of the step; a
    # replaced corrupt sample is a warning on the driver's console, whichever rank met it.
    data_warnings = ProgressPoster(cfg.get("progress_name"))
    feed = Feed(train_store, task.batch_maker(train_store), client.get, workers=data_cfg.get("feed_workers", 0),
                depth=data_cfg.get("feed_prefetch", 4), seed=train_cfg["seed"], rank=rank,
                say=lambda message: data_warnings.post("warning", message=message))
    refresher = ray.get_actor(cfg["refresher_name"]) if cfg.get("refresher_name") else None
    poster = ProgressPoster(cfg.get("progress_name"), enabled=rank == 0)
    # metrics go to metrics.jsonl at once and to MLflow from a thread: a slow or stopped server never
    # holds up training (what it missed is sent when it answers again, or by the driver at the end)
    tracker = RunTracker(cfg["tracking_uri"], cfg["run_id"], cfg["metrics_path"], enabled=rank == 0,
                         background=True, source="worker", say=lambda message: poster.post("warning", message=message))
    poster.post("start", epoch=start_epoch)  # every (re)start of the worker group
    # (5) the refresh protocol (samplers.protocol): snapshot and activation steps fixed in advance
    schedule = RefreshSchedule(spe, epochs, refresh_cfg["every_epochs"], refresh_cfg["every_steps"],
                               refresh_cfg["mode"], refresh_cfg.get("lag_steps"))
    if refresher is None:
        schedule = RefreshSchedule(spe, epochs)  # no refresh
    boundaries, activations = set(schedule.boundaries()), set(schedule.activations())
    sync = schedule.mode == "sync"
    caller = (_RefreshCaller(refresher, train_store, schedule, cfg["snapshot_root"], tracker, poster)
              if rank == 0 and refresher is not None else None)
    if caller is not None:
        caller.attempt = rewound["attempt"]
        caller.restart(model, start_epoch * spe, rewound["kept"])
    best = BestEncoder(cfg["best_dir"], cfg["network"]) if rank == 0 and cfg.get("best_dir") else None
    keep = cfg.get("checkpoint_keep")

    pace_s = float(os.environ.get(PACE_ENV) or 0.0)
    paced_until = time.monotonic()
    for epoch in range(start_epoch, epochs):
        model.train()
        window_start, window_steps, window_loss, window_wait = time.perf_counter(), 0, 0.0, 0.0
        window_extras: dict[str, float] = {}
        for local_step in range(spe):
            step = epoch * spe + local_step
            _maybe_fail(rank, step)
            if pace_s > 0:
                time.sleep(max(0.0, paced_until - time.monotonic()))
                paced_until = time.monotonic() + pace_s
            # (3) feed: this rank's row of the global plan; the task fetches its columns and views.
            t_wait = time.perf_counter()
            # nobody asks for plans past an activation step before its graph version is in
            horizon = schedule.horizon(step)
            batch, version = feed.next(step, horizon, end=epochs * spe)
            window_wait += time.perf_counter() - t_wait

            torch.manual_seed(step_seed(train_cfg["seed"], rank, step))  # this step's draws, replayable
            lr = lr_at(epoch + local_step / spe, train_cfg["lr"], train_cfg["warmup_epochs"], epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, extras = task.batch_loss(model, batch, device)
            stepper.step(loss)
            task.after_step(model, (step + 1) / (epochs * spe))
            window_loss += loss.item()
            window_steps += 1
            for key, value in extras.items():
                window_extras[key] = window_extras.get(key, 0.0) + value

            if (step + 1) % train_cfg["log_every_steps"] == 0 or local_step == spe - 1:
                mean_loss = mean_across_ranks(window_loss / window_steps, device)
                skipped = mean_across_ranks(float(feed.skipped), device) * world  # corrupt samples replaced, all ranks
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"train/loss is {mean_loss} at step {step + 1} "
                                             f"(loss {conf['loss']['name']}); stopping before the weights are lost")
                elapsed = time.perf_counter() - window_start
                metrics = {"train/loss": mean_loss, "train/lr": lr, "graph/version": version,
                           "train/samples_per_s": window_steps * train_cfg["batch_size"] / elapsed,
                           "train/data_wait_s": window_wait / window_steps, "data/skipped": skipped, "epoch": epoch,
                           **{k: v / window_steps for k, v in window_extras.items()}}  # rank 0's
                tracker.log_metrics(metrics, step=step + 1)
                poster.post("window", epoch=epoch, step=step + 1, steps=window_steps, seconds=elapsed,
                            loss=mean_loss, samples_per_s=metrics["train/samples_per_s"], version=version)
                window_start, window_steps, window_loss, window_wait = time.perf_counter(), 0, 0.0, 0.0
                window_extras = {}

            # (5) refresh: rank 0 snapshots the weights and asks the refresher for a new graph version,
            # active from the step the schedule fixed; there, every rank waits until it is in.
            if caller is not None and step + 1 in activations and not sync:
                caller.finish(block=True, step=step + 1)  # the version used from here on (a late one: stall)
            if caller is not None and step + 1 in boundaries:
                caller.trigger(model, step + 1)  # sync: waits for it here (its activation step)
            if step + 1 in activations:
                _barrier()
                client.reset()
            elif caller is not None and step + 1 < epochs * spe:
                caller.poll(step + 1)

        # (4) evaluate on rank 0, then report; every rank reports (a barrier), rank 0 attaches the checkpoint.
        metrics = {"epoch": epoch}
        if rank == 0:
            plans, filled = ray.get(sampler.plans_with_fill.remote(epoch * spe, (epoch + 1) * spe))
            metrics.update(task.evaluate(model, train_store, test_store, plans, final=epoch + 1 == epochs))
            metrics["sampler/filled_ids"] = int(filled.sum())  # ids the walk did not choose (uniform fill)
            if device.type == "cuda":  # the peak so far, training and evaluation together
                metrics["gpu/max_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            if best is not None and best.offer(model, metrics, epoch, (epoch + 1) * spe):
                metrics["checkpoint/best_epoch"] = epoch + 1
            tracker.log_metrics(metrics, step=(epoch + 1) * spe)
            poster.post("epoch", epoch=epoch, step=(epoch + 1) * spe,
                        metrics={k: float(v) for k, v in metrics.items() if k != "epoch"})
        ckpt_name = f"epoch_{epoch:04d}"
        with tempfile.TemporaryDirectory() as tmp:
            report_ckpt = None
            if rank == 0:
                save_network(model, cfg["network"], tmp)  # model.pt (CPU tensors) and network.json
                torch.save(optimizer.state_dict(), Path(tmp, OPTIM_FILE))
                stepper.save(Path(tmp))
                task.save_state(Path(tmp))
                sampler_state = ray.get(sampler.state.remote())
                Path(tmp, META_FILE).write_text(json.dumps(
                    {"epoch": epoch, "step": (epoch + 1) * spe, "sampler": sampler_state}))
                report_ckpt = ray.train.Checkpoint.from_directory(tmp)
            try:
                ray.train.report(metrics, checkpoint=report_ckpt, checkpoint_dir_name=ckpt_name)
            except OSError as err:  # persisting the checkpoint (this rank's) failed: say which, plainly
                if report_ckpt is None:
                    raise
                raise CheckpointWriteError(f"cannot write the checkpoint of epoch {epoch + 1} ({ckpt_name}): "
                                           f"{type(err).__name__}: {err}") from err
        if rank == 0 and keep is not None:  # retention: graph versions no kept checkpoint needs
            floor = retention_floor(epoch, spe, keep, caller.plan_floor() if caller is not None else None)
            pruned = prune_graph_versions(sampler, floor)
            if pruned:
                tracker.log_metrics({"checkpoint/pruned_graph_files": len(pruned)}, step=(epoch + 1) * spe)

    feed.close()
    if caller is not None:
        # let a refresh in flight land, within refresh.final_wait_s
        caller.finish(block=True, step=epochs * spe, teardown=True, timeout_s=refresh_cfg.get("final_wait_s"))
    unsent = tracker.close(timeout_s=TRACKER_CLOSE_S)
    if unsent:
        poster.post("warning", message=f"{unsent} metric lines are not in MLflow yet (it does not answer); they "
                                        f"are in {cfg['metrics_path']} and the driver sends them at the end")


def _refresh_metrics(info: dict[str, Any]) -> dict[str, float]:
    out = {"refresh/embed_seconds": info["embed_seconds"], "refresh/graph_seconds": info["graph_seconds"],
           "refresh/version": info["version"], "refresh/activate_step": info["activate_step"]}
    out.update({f"graph/{k}": v for k, v in info["stats"].items()})
    if "drift" in info:
        out["refresh/embedding_drift"] = info["drift"]
        out["refresh/neighbour_overlap"] = info["neighbour_overlap"]
    return out
