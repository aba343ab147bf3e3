"""``hardbatch run``: the driver of one training job.

    hardbatch run configs/digits.yaml --set train.epochs=5

Order of events (everything that can be wrong with the config fails before Ray starts):
  1. validate the config (:mod:`pipelines.config`);
  2. start a local Ray on 127.0.0.1, or connect where ``RAY_ADDRESS`` is set;
  3. create the MLflow run: the whole resolved config and derived values as params, the config file
     as an artifact;
  4. read the source through Ray Data into train/held-out SampleStores (the source is listed, split
     and checked before Ray starts: a bad path or column fails here, in one line);
  5. start the sampler actor and the graph refresher; build graph version 0 from the initial weights
     while the Train workers start (each waits for it before its first plan);
  6. train with ``TorchTrainer`` (Train V2); rank 0 logs to the same MLflow run;
  7. close the run and print its id and the command that opens the MLflow UI.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipelines.config import (Config, ConfigError, check_cluster, check_resources, cpus_per_worker, local_cpus,
                              reachable_resources, train_worker_gpus)
from trainers.tracking import PARENT_RUN_TAG, check_tracking_server, experiment_id_for, resolve_tracking_uri

NAMESPACE = "hardbatch"


@dataclass(frozen=True)
class RunResult:
    run_id: str
    tracking_uri: str
    run_dir: Path
    metrics: dict[str, Any]


class RunFailed(RuntimeError):
    """Training failed for good (``train.max_failures`` spent): why, in the workers' words, and what
    survives. The CLI prints the message as is (no driver traceback: the workers' own went to the
    console as they failed)."""


def last_checkpoint(run_dir: Path) -> Optional[str]:
    """The newest checkpoint Ray Train registered for the run (the one a resume starts from), from its
    checkpoint manager's snapshot; ``None`` when there is none or it cannot be read. A directory that
    was being written when storage failed is never registered, so it is never named here."""
    try:
        snapshot = json.loads((run_dir / "train" / "checkpoint_manager_snapshot.json").read_text())
        return snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_failure(err: BaseException, run_dir: Path, run_name: str) -> str:
    """One paragraph for a failed run: each failed rank's error (first line), what is intact, how to
    resume. A checkpoint that could not be written (:class:`trainers.loop.CheckpointWriteError`) is
    named as a storage problem."""
    from trainers.callbacks import error_line
    from trainers.loop import CheckpointWriteError

    failures = getattr(err, "worker_failures", None) or {}
    causes = failures.items() if failures else [(None, err)]
    said = "; ".join(f"rank {rank} {error_line(e, 300)}" if rank is not None else error_line(e, 300)
                     for rank, e in causes)
    storage = any(isinstance(e, CheckpointWriteError) for _, e in causes)
    latest = last_checkpoint(run_dir)
    if latest is None:
        kept = "no checkpoint was written; the same command starts the run again"
    else:
        epoch = int(latest.rsplit("_", 1)[-1]) + 1
        kept = (f"the checkpoint of epoch {epoch} ({run_dir / 'train' / latest}) is intact; "
                f"{'once the storage takes writes again, ' if storage else ''}the same command "
                f"(tracking.run_name={run_name}) resumes the run from it")
    return f"run {run_name} failed: {said}. The MLflow run is marked FAILED; {kept}"


def init_ray(config: Config) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a private local Ray bound to 127.0.0.1.

    Unless ``--verbose``, Ray's INFO lines are turned down and its known-harmless lines dropped
    (:mod:`pipelines.console`).
    """
    import logging

    import ray

    from pipelines.console import drop_harmless_worker_lines
    from trainers.progress import is_verbose, quiet_logging

    if ray.is_initialized():
        return
    verbose = is_verbose()
    quiet_logging(verbose)
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # The Train controller looks at its workers every 2 s by default, so the end of training (and a
    # dead worker) is noticed up to 2 s late; the run's end waited 4.1 s for fit() to return, 1.1 s
    # at 0.5 s. A poll is one small RPC per worker. Ray Train hands this variable on from the
    # driver to its controller, also on a cluster; a value set by the user wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not sys.stdout.isatty():  # worker lines in a log file or pipe: no ANSI colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    level = logging.INFO if verbose else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace=NAMESPACE, log_to_driver=True, logging_level=level)
    else:
        # Ray's own helpers find "their" cluster by address only: Ray Train's PlacementGroupCleaner
        # asks the state API every second, with no address, whether the controller lives. With a
        # second Ray on the machine (another run, a `ray start` head) it finds several, or the wrong
        # one, and dies with a traceback. So the GCS port is chosen here and every process of this
        # Ray gets RAY_ADDRESS pointing at its own GCS (the driver's environment is left alone).
        port = free_loopback_port()
        previous = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            ray.init(address="local", namespace=NAMESPACE, num_cpus=local_cpus(config),
                     object_store_memory=config.ray.object_store_mb * 1024 * 1024, logging_level=level,
                     include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}})
        finally:
            if previous is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = previous
    if not verbose:
        drop_harmless_worker_lines()
    stop_on_sigterm()  # after ray.init: Ray's core worker installs a SIGTERM handler that aborts


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it; it may be taken again later)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler, ``ray job stop``) stops a run as Ctrl-C does: as a
    ``KeyboardInterrupt`` in the main thread, so the run's clean-up runs (MLflow run marked KILLED)
    before the process exits. Only from the main thread (the only one that may set handlers)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)


def autoscaler_limits() -> tuple[Optional[dict[str, float]], bool]:
    """The resources the cluster's autoscaler config allows (``None`` without an autoscaler, as on a
    head started by hand) and whether it can add nodes.

    Read from the cluster config the autoscaler publishes in the GCS, through the same (private) Ray
    API Ray Data uses to size its requests; if it cannot be read, the cluster counts as fixed.
    """
    try:
        from ray._private.state import state

        cluster = state.get_cluster_config()
        limits = state.get_max_resources_from_cluster_config() if cluster is not None else None
    except Exception:  # a private API: never let it take the run down
        return None, False
    if cluster is None:
        return None, False
    can_grow = any(group.max_count == -1 or group.max_count > group.min_count
                   for group in cluster.node_group_configs if group.resources and group.max_count != 0)
    return ({k: float(v) for k, v in limits.items()} if limits else None), can_grow


def check_capacity(config: Config, uri: str) -> float:
    """Check, once connected and before taking anything, that this Ray can run the job; returns the
    CPUs it has (a local Ray) or can have (a cluster, its autoscaler included)."""
    import ray

    current = ray.cluster_resources()
    if not os.environ.get("RAY_ADDRESS"):
        check_resources(config, float(current.get("CPU", 0)))
        return float(current.get("CPU", 0))
    limits, can_grow = autoscaler_limits()
    reachable = reachable_resources(current, limits)
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    check_cluster(config, uri, nodes, can_grow, reachable)
    return reachable.get("CPU", 0.0)


def fit_interruptibly(trainer):
    """``trainer.fit()`` in a thread of its own, so that Ctrl-C and SIGTERM reach this, the main,
    thread as ``KeyboardInterrupt`` and the run stops at once, marked KILLED.

    In the main thread, Ray Train installs its own SIGINT handler, which aborts the controller and
    then exits the process with status 0, past the run's own clean-up. When the driver stops, Ray
    stops the Train controller and workers of its job; the checkpoints already written stay.
    """
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread as is
            box["error"] = err

    thread = threading.Thread(target=target, name="hardbatch-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # short waits: a signal is handled between them
    if "error" in box:
        raise box["error"]
    return box["result"]


DISK_PARTS = {"train": "checkpoints", "graphs": "graph versions", "best": "best encoder", "store": "stored samples",
              "snapshots": "weight snapshots"}


def disk_use(run_dir: Path) -> dict[str, int]:
    """Bytes under ``run_dir`` by part (:data:`DISK_PARTS`, the rest as ``other``). O(files)."""
    out = {name: 0 for name in [*DISK_PARTS.values(), "other"]}
    for path in run_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            top = path.relative_to(run_dir).parts[0]
            out[DISK_PARTS.get(top, "other")] += path.stat().st_size
    return out


def derive(config: Config, cluster_cpus: float, train_size: int) -> dict[str, Any]:
    """Quantities computed once on the driver and logged beside the config."""
    from samplers.protocol import RefreshSchedule

    world = config.train.num_workers
    spe = train_size // config.train.batch_size
    refresh = config.refresh
    schedule = RefreshSchedule(spe, config.train.epochs, refresh.every_epochs, refresh.every_steps, refresh.mode,
                               refresh.lag_steps)
    return {
        "derived.per_worker_batch": config.train.batch_size // world,
        "derived.steps_per_epoch": spe,
        "derived.cpus_per_worker": cpus_per_worker(config, cluster_cpus),
        "derived.cluster_cpus": cluster_cpus,
        "derived.train_size": train_size,
        "derived.refresh_lag_steps": schedule.lag,  # a graph made at step s is used from s + this
    }


def training_setup(config: Config, train_store) -> tuple[dict[str, Any], dict[str, Any], Optional[dict[str, Any]]]:
    """What the workers build: the network spec, the loss's constructor arguments, its training options.

    ``soft_infonce`` gets its noise distribution here, from the training split's class frequencies
    (``loss.soft_infonce.noise_from: train_frequencies``, ALGORITHMS.md 1.3) unless ``noise`` is
    given; classes absent from the split would make ``log q`` infinite and are refused.
    """
    import numpy as np
    import torch

    from trainers.losses import class_frequencies
    from trainers.models import network_spec

    kind = config.loss.kind
    kwargs = config.loss.hyperparameters()
    training = config.loss.training()
    options = training.model_dump() if training is not None else None
    v_shape = num_classes = None
    if kind == "bimodal":
        v_shape = train_store.v_shape
    if kind == "classifier":
        labels = train_store.labels
        num_classes = train_store.num_classes  # the source's classes, not labels.max() + 1: a class may be missing
        if "noise" not in kwargs and options["noise_from"] == "train_frequencies":
            q = class_frequencies(torch.from_numpy(np.asarray(labels)), num_classes)
            if (q == 0).any():
                raise ConfigError(f"loss.soft_infonce.noise_from = 'train_frequencies': classes "
                                  f"{torch.nonzero(q == 0).flatten().tolist()} have no training sample")
            kwargs["noise"] = q.tolist()
    spec = network_spec(kind, config.model.model_dump(), train_store.sample_shape, v_shape, num_classes)
    return spec, kwargs, options


def feed_setup(config: Config, train_store, cpus_per_worker: float) -> dict[str, Any]:
    """What each worker's feed needs: the resolved augmentation preset and the feed's size."""
    from trainers.augment import resolve_preset
    from trainers.feed import default_workers

    shape = train_store.sample_shape
    preset = resolve_preset(config.augment.preset, config.data.source, shape[0] if len(shape) == 3 else 0)
    workers = config.data.feed_workers if config.data.feed_workers is not None else default_workers(cpus_per_worker)
    return {"augment": {"preset": preset, "blur": config.augment.blur, "crop_min": config.augment.crop_min},
            "feed_workers": workers,
            "feed_prefetch": config.data.feed_prefetch}


def data_params(prepared, splits, data_setup: dict[str, Any]) -> dict[str, Any]:
    """The data facts logged as params: sizes, decoded shape, classes, store, feed."""
    classes = prepared.classes or []
    names = ", ".join(classes)
    if len(names) > 500:
        names = names[:500] + f" ... ({len(classes)} classes; data/items_train.csv has them all)"
    return {"derived.test_size": splits.test.size,
            "derived.sample_shape": "x".join(str(d) for d in splits.train.sample_shape),
            "derived.num_classes": len(classes), "derived.classes": names or "-",
            "derived.store_location": splits.info["location"], "derived.store_shards": splits.info["shards"],
            "derived.augment_preset": data_setup["augment"]["preset"], "derived.feed_workers": data_setup["feed_workers"]}


def data_line(config: Config, prepared, splits) -> str:
    """One line on the data: source, sizes, classes, decoded shape, where the store lives and its build time."""
    classes = f"{len(prepared.classes)} classes" if prepared.classes else "unlabelled"
    held = f"data.test_source {config.data.test_source}" if config.data.test_source else "held out"
    info = splits.info
    return (f"data: {config.data.source}: {splits.train.size} training / {splits.test.size} {held} samples, {classes}, "
            f"decoded {'x'.join(str(d) for d in splits.train.sample_shape)}; store: {info['location']}, "
            f"{info['stored_bytes'] / 2**20:.1f} MiB stored in {info['shards']} shards, "
            f"{'reused' if info['reused'] else 'built'} in {info['build_seconds']:.1f} s")


def resolved_loss_params(config: Config, loss_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every hyper-parameter of the loss as it will run (defaults filled in), cross-rank flags
    included, as ``loss.resolved.*`` params; the noise distribution is abbreviated."""
    from trainers.losses import LOSSES

    loss = LOSSES[config.loss.name](**loss_kwargs)
    params = {f"loss.resolved.{k}": v for k, v in loss.hparams().items()}
    if params.get("loss.resolved.noise") is not None:
        params["loss.resolved.noise"] = "[" + ", ".join(f"{q:.4f}" for q in params["loss.resolved.noise"]) + "]"
    params["loss.resolved.distributed_flags"] = ",".join(loss.distributed_flags) or "-"
    return params


def _start_mlflow_run(config: Config, uri: str, run_name: str, parent_run_id: Optional[str] = None):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = experiment_id_for(client, config.tracking.experiment, uri)
    tags = {"hardbatch.loss": config.loss.name, "hardbatch.sampler": config.sampler.name,
            "hardbatch.source": config.data.source}
    if parent_run_id:
        tags[PARENT_RUN_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return client, run.info.run_id


def run(config: Config, config_path: Optional[str] = None, parent_run_id: Optional[str] = None) -> RunResult:
    """Run one job end to end; see the module docstring.

    Args:
        config: the validated config.
        config_path: the YAML file it came from (logged as an artifact).
        parent_run_id: make the MLflow run a child of this run (sweeps).
    """
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from pipelines.console import Console, ConsolePump
    from pipelines.datasets import build_stores
    from pipelines.refresh import GraphRefresher
    from samplers.actor import start_sampler
    from trainers.callbacks import FailureReporter
    from trainers.loop import train_loop_per_worker
    from trainers.models import build_network, save_weights
    from trainers.progress import ProgressRelay, is_verbose, quiet_logging
    from trainers.tracking import RunTracker

    t_called = time.perf_counter()
    quiet_logging()
    uri = resolve_tracking_uri(config.tracking.uri)
    try:
        check_tracking_server(uri)  # an http(s) server that does not answer, or refuses us: one line, no Ray
    except ValueError as err:
        raise ConfigError(f"tracking.uri = {uri!r}: {err}") from None
    run_name = config.tracking.run_name or (
        f"{config.loss.name}-{config.sampler.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(config.storage.path).resolve() / run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"storage.path = {config.storage.path!r}: cannot create {str(run_dir)!r} "
                          f"({err.strerror})") from None

    # Checked before Ray starts: re-running a run name continues that run unless it finished.
    run_file = run_dir / "run.json"
    resume = run_file.exists()
    if resume:  # the same run name again: continue the run that crashed
        run_id = json.loads(run_file.read_text())["run_id"]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        if client.get_run(run_id).info.status == "FINISHED":
            raise ConfigError(f"tracking.run_name = {run_name!r}: that run already finished "
                              f"({run_dir}); choose another run name")
        saved_config = run_dir / "config.json"
        if saved_config.exists():  # runs started before this file existed resume unchecked
            from pipelines.config import check_resume

            check_resume(json.loads(saved_config.read_text()), config)

    # Checked before Ray starts: the data is listed (or, on resume, its fixed listing read back) and split.
    from pipelines.config import check_dataset_size, check_model
    from pipelines.datasets import prepare_data
    from pipelines.sources import SourceError

    try:
        prepared = prepare_data(config.data.model_dump(), config.eval.model_dump(), run_dir)
    except SourceError as err:
        raise ConfigError(str(err)) from None
    check_dataset_size(config, prepared.sizes["train"])
    check_model(config, prepared.sample_shape)

    init_ray(config)
    cluster_cpus = check_capacity(config, uri)

    if resume:
        client.update_run(run_id, status="RUNNING")
        _print(f"resuming run {run_name} ({run_id}) from its last checkpoint and graph version")
    else:
        client, run_id = _start_mlflow_run(config, uri, run_name, parent_run_id)
        (run_dir / "config.json").write_text(json.dumps(config.flat(), indent=1, default=str))  # check_resume
        run_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    tracker = RunTracker(uri, run_id, str(run_dir / "metrics.jsonl"))
    status, actors, pump, disk = "FAILED", [], None, {}
    try:
        t_start = time.perf_counter()
        try:
            splits = build_stores(prepared, config.data.store, run_dir / "store")
        except SourceError as err:
            raise ConfigError(str(err)) from None
        derived = derive(config, cluster_cpus, splits.train.size)
        spe = derived["derived.steps_per_epoch"]
        network, loss_kwargs, loss_options = training_setup(config, splits.train)
        data_setup = feed_setup(config, splits.train, derived["derived.cpus_per_worker"])
        if not resume:
            tracker.log_params({**config.flat(), **derived, **resolved_loss_params(config, loss_kwargs),
                                "derived.network_kind": network["kind"], **data_params(prepared, splits, data_setup)})
            for path in prepared.item_files.values():  # the id -> item map of the run
                tracker.log_artifact(str(path), "data")
        tracker.log_metrics({"data/store_build_seconds": splits.info["build_seconds"],
                             "data/stored_mb": splits.info["stored_bytes"] / 2**20,
                             "data/unreadable": len(splits.info["unreadable"])}, step=0)
        _print(data_line(config, prepared, splits))
        for location, reason in splits.info["unreadable"][:5]:
            _print(f"data: could not read {location} ({reason}); it is replaced like a corrupt image")
        if not splits.train.has_labels or not splits.test.has_labels:
            _print(f"data: {config.data.source} has no labels: eval/knn_acc and the linear probe are skipped "
                   f"(alignment and uniformity still run)")
        with tempfile.TemporaryDirectory() as tmp:
            resolved = Path(tmp, "config.resolved.yaml")
            resolved.write_text(config.to_yaml())
            tracker.log_artifact(str(resolved), "config")
            if config_path:
                tracker.log_artifact(str(config_path), "config")
        _print(f"run {run_name}: {splits.train.size} training / {splits.test.size} held-out samples, "
               f"{spe} steps per epoch, {config.train.num_workers} workers x {derived['derived.per_worker_batch']}")

        # (5) sampler actor and graph version 0, built from the same initial weights the workers use.
        use_graph = config.sampler.name != "uniform"
        planner_kwargs = dict(num_nodes=splits.train.size, global_batch=config.train.batch_size,
                              world_size=config.train.num_workers, seed=config.train.seed,
                              strategy=config.sampler.name, restart_prob=config.sampler.restart_prob,
                              warmup_epochs=config.sampler.warmup_epochs,
                              restart_decay=config.sampler.restart_decay)
        sampler_name = f"sampler-{run_id}"
        state_file = run_dir / "sampler_state.json"
        sampler = start_sampler(sampler_name, planner_kwargs, str(state_file))
        actors.append(sampler)
        refresher_name, graph_v0, v0_report = None, None, None
        if use_graph:
            has_versions = bool(json.loads(state_file.read_text())["versions"]) if state_file.exists() else False
            refresher_name = f"refresher-{run_id}"
            refresher = GraphRefresher.options(name=refresher_name).remote(
                network, config.sampler.model_dump(),
                config.refresh.model_dump(), str(run_dir / "graphs"), sampler_name, config.train.seed)
            actors.append(refresher)
            if not has_versions:  # graph v0 from the initial weights (a resumed run reloads its versions)
                init_dir = run_dir / "init"
                init_dir.mkdir(exist_ok=True)
                torch.manual_seed(config.train.seed)  # the workers' initial weights (same seed, same spec)
                save_weights(build_network(network), init_dir / "model.pt")
                # Built while the Train workers start (both take seconds, mostly process start-up):
                # each worker waits for it before its first plan, so plans never come without it.
                graph_v0 = refresher.refresh.remote(splits.train, str(init_dir), 0)
                v0_report = _GraphV0Report(graph_v0, tracker).start()

        # (6) train; rank 0 posts its progress to the relay, the driver prints it.
        progress_name = f"progress-{run_id}"
        relay = ProgressRelay.options(name=progress_name).remote()
        actors.append(relay)
        pump = ConsolePump(relay, Console(config.train.epochs, spe, config.train.batch_size)).start()
        loop_cfg = {
            "config": config.model_dump(), "steps_per_epoch": spe,
            "train_store": splits.train, "test_store": splits.test,
            "sampler_name": sampler_name, "refresher_name": refresher_name,
            "tracking_uri": uri, "run_id": run_id, "metrics_path": str(run_dir / "metrics.jsonl"),
            "snapshot_root": str(run_dir / "snapshots"), "eval": config.eval.model_dump(),
            "best_dir": str(run_dir / "best"), "checkpoint_keep": config.checkpoint.keep,
            "network": network, "loss_kwargs": loss_kwargs, "loss_options": loss_options, "data": data_setup,
            "progress_name": progress_name, "graph_v0": graph_v0,
        }
        worker_resources = {"CPU": derived["derived.cpus_per_worker"]}
        if config.train.use_gpu:  # less than 1 when a fractional embedding actor shares the GPU
            worker_resources["GPU"] = train_worker_gpus(config)
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=loop_cfg,
            scaling_config=ScalingConfig(num_workers=config.train.num_workers, use_gpu=config.train.use_gpu,
                                         resources_per_worker=worker_resources),
            run_config=RunConfig(name="train", storage_path=str(run_dir),
                                 failure_config=FailureConfig(max_failures=config.train.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
                                 callbacks=[FailureReporter(progress_name)],
                                 logging_config=LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")),
        )
        _print(f"starting {config.train.num_workers} Ray Train workers "
               f"({derived['derived.cpus_per_worker']:g} CPUs"
               f"{f' and {train_worker_gpus(config):g} GPU' if config.train.use_gpu else ''} each)")
        try:
            result = fit_interruptibly(trainer)
        except TrainingFailedError as err:
            raise RunFailed(describe_failure(err, run_dir, run_name)) from err
        if v0_report is not None:
            v0_report.join()
        if result.error is not None:
            raise RunFailed(describe_failure(result.error, run_dir, run_name)) from result.error
        wall = time.perf_counter() - t_start
        from trainers.tracking import send_pending

        # what rank 0 could not hand to MLflow before it stopped (the server was down at the end)
        unsent = send_pending(uri, run_id, run_dir / "metrics.jsonl", "worker", timeout_s=60.0)
        if unsent:
            _print(f"{unsent} metric lines are not in MLflow ({uri} does not answer); they stay in "
                   f"{run_dir / 'metrics.jsonl'}")
        disk = disk_use(run_dir)
        tracker.log_metrics({"run/wall_seconds": wall, "run/disk_bytes": sum(disk.values())},
                            step=config.train.epochs * spe)
        _log_encoders(uri, run_id, result.checkpoint, run_dir, splits.train, tracker, config.train.epochs * spe)
        status = "FINISHED"
        final = client.get_run(run_id).data.metrics
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (pipelines.cli): a stop, not a failure; resumable
        status = "KILLED"
        raise
    finally:
        if pump is not None:
            pump.stop()  # print what the workers posted last
        client.set_terminated(run_id, status=status)
        # The run is over; its state is on disk. Stopped by a signal, the Train workers may still be
        # running: their actors go with the driver's job, all at once, instead of under them.
        if status == "KILLED":
            ray.shutdown()  # at once, before the orphaned workers' complaints reach this console
        for actor in actors if status != "KILLED" else ():
            ray.kill(actor, no_restart=True)
    total = time.perf_counter() - t_called
    shown = [f"{key} {final[key]:.4f}" for key in ("eval/knn_acc", "eval/linear_acc", "eval/retrieval_acc",
                                                  "eval/accuracy") if key in final]
    _print(f"done: {', '.join(shown) + '; ' if shown else ''}{wall:.0f} s of training, "
           f"{total:.0f} s in all with Ray start-up")
    _print(f"checkpoints, graph versions and metrics.jsonl: {run_dir}")
    if disk:
        parts = ", ".join(f"{name} {size / 2**20:.1f}" for name, size in disk.items() if size)
        _print(f"disk: {sum(disk.values()) / 2**20:.1f} MiB ({parts})")
    _print(f"MLflow run id: {run_id}")
    _print(f"open the MLflow UI: {_mlflow_command()} ui --backend-store-uri {uri} --host 127.0.0.1")
    return RunResult(run_id=run_id, tracking_uri=uri, run_dir=run_dir, metrics=final)


class _GraphV0Report:
    """Waits, in a thread, for graph version 0 (built while the Train workers start), then logs its
    metrics and manifest and prints its line. A failed build is not reported here: the workers wait
    on the same reference, so the run fails with the build's error."""

    def __init__(self, ref, tracker):
        import threading

        self._ref, self._tracker = ref, tracker
        self._thread = threading.Thread(target=self._wait, name="hardbatch-graph-v0", daemon=True)

    def start(self) -> "_GraphV0Report":
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join()

    def _wait(self) -> None:
        import ray

        try:
            info = ray.get(self._ref)
        except Exception:  # noqa: BLE001 -- the workers raise it; see the class docstring
            return
        self._tracker.log_metrics({"refresh/embed_seconds": info["embed_seconds"],
                                   "refresh/graph_seconds": info["graph_seconds"], "graph/version": 0,
                                   **{f"graph/{k}": v for k, v in info["stats"].items()}}, step=0)
        self._tracker.log_artifact(info["manifest"], "graphs")
        _print(f"graph v0: {info['embed_seconds']:.1f} s embedding, {info['graph_seconds']:.2f} s build")


def _log_encoders(uri: str, run_id: str, checkpoint, run_dir: Path, train_store, tracker, step: int) -> None:
    """The trained encoder as MLflow models ``encoder`` and ``encoder_best`` (:mod:`pipelines.export`).
    A failure is a warning, not a failed run: the checkpoints still hold the weights."""
    from pipelines.export import example_rows, log_encoders

    try:
        with checkpoint.as_directory() as final_dir:
            logged = log_encoders(uri, run_id, final_dir, run_dir / "best", example_rows(train_store),
                                  metrics_file=run_dir / "metrics.jsonl")
    except Exception as err:  # noqa: BLE001 -- tracking never fails a finished training
        _print(f"warning: the encoder could not be logged to MLflow ({type(err).__name__}: "
               f"{str(err).splitlines()[0][:200] if str(err) else ''}); the checkpoints hold it: {checkpoint.path}")
        return
    tracker.log_metrics({"run/log_model_seconds": logged["seconds"]}, step=step)
    models = "encoder" + (" and encoder_best" if logged["best"] else "")
    _print(f"MLflow models {models} logged in {logged['seconds']:.1f} s: "
           f"mlflow.pytorch.load_model('runs:/{run_id}/encoder')")


def _mlflow_command() -> str:
    """``mlflow``, or its full path when the one installed beside this Python is not on PATH."""
    beside = Path(sys.executable).with_name("mlflow")
    return str(beside) if beside.exists() and shutil.which("mlflow") != str(beside) else "mlflow"


def _print(message: str) -> None:
    from pipelines.console import say

    say(message)
