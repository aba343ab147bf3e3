"""``hardbatch sweep``: every combination of a grid of config values, as child runs of one MLflow run.

    hardbatch sweep configs/digits.yaml --grid loss.name=infonce,sscl,mveb --grid sampler.name=uniform,rwr \\
        --seeds 3 --set train.epochs=10

Order of events:
  1. expand the grid (the cartesian product of every ``--grid key=v1,v2,...``) times the seeds
     (``train.seed + 0 .. seeds - 1``) and validate every child's config; a bad value fails here,
     in one line naming the field, before anything starts;
  2. create the parent MLflow run (tag ``hardbatch.kind = sweep``, the grid keys in
     ``hardbatch.grid``) in the config's ``tracking.experiment``;
  3. run the children with :func:`pipelines.run.run`: one after another in this process, or, on a
     cluster with room for several runs and an MLflow server as the store, several at once as Ray
     tasks (a sqlite file is never written by concurrent runs);
  4. tag every child with its variant and seed, and close the parent (``FAILED`` if a child failed).

:mod:`pipelines.compare` reads the result back and tables and plots it.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pipelines.config import Config, ConfigError, cpus_per_worker, gpu_demand, load_config, parse_override
from pipelines.run import _print
from trainers.tracking import check_tracking_server, experiment_id_for, resolve_tracking_uri

KIND_TAG = "hardbatch.kind"
GRID_TAG = "hardbatch.grid"
VARIANT_TAG = "hardbatch.variant"
SEED_TAG = "hardbatch.seed"

Runner = Callable[[Config, Optional[str], Optional[str]], Any]


@dataclass(frozen=True)
class Child:
    """One run of a sweep: a variant (a value for every grid key) and a seed.

    Attributes:
        variant: ``"key=value,key=value"`` in grid order; the same for every seed.
        seed: the child's ``train.seed``.
        run_name: its MLflow run name (also its directory under ``storage.path``).
        config: its validated config.
    """

    variant: str
    seed: int
    run_name: str
    config: Config


@dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep will run, validated, before anything starts."""

    name: str
    config_path: str
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    tracking_uri: str
    experiment: str
    children: tuple[Child, ...]


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    finished: list[tuple[Child, Any]] = field(default_factory=list)
    failed: list[tuple[Child, str]] = field(default_factory=list)


def parse_grid(spec: str) -> tuple[str, tuple[Any, ...]]:
    """``"sampler.name=uniform,rwr"`` -> ``("sampler.name", ("uniform", "rwr"))``.

    Values are parsed as YAML scalars, like ``--set`` values (``train.lr=1e-3,2e-3`` gives floats).

    Raises:
        ConfigError: no ``=``, no value, or a repeated value.
    """
    key, sep, raw = spec.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"--grid {spec!r}: expected key=value1,value2,..., for example --grid sampler.name=uniform,rwr")
    texts = [part.strip() for part in raw.split(",")]
    if any(not text for text in texts):
        raise ConfigError(f"--grid {spec!r}: empty value in the list")
    if len(set(texts)) != len(texts):
        raise ConfigError(f"--grid {spec!r}: a value is repeated")
    return key, tuple(parse_override(f"{key}={text}")[1] for text in texts)


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "x"


def plan_sweep(config_path: str, grid_specs: Sequence[str], seeds: int = 1, overrides: Sequence[str] = (),
               name: Optional[str] = None) -> SweepPlan:
    """Expand and validate a sweep; nothing is started.

    Args:
        config_path: the base YAML config.
        grid_specs: ``key=v1,v2,...`` strings; the sweep is their cartesian product.
        seeds: runs per variant, with ``train.seed`` = base seed + 0 .. seeds - 1.
        overrides: ``--set`` strings applied to every child before the grid values.
        name: the sweep's (parent run's) name; default ``sweep-<time>``.

    Raises:
        ConfigError: a malformed ``--grid``, a repeated grid key, or a combination whose config is
            invalid (the message names the variant and the field).
    """
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be at least 1")
    grid = tuple(parse_grid(spec) for spec in grid_specs)
    keys = [key for key, _ in grid]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid: key repeated in {keys}; give all its values in one --grid")
    if "train.seed" in keys and seeds > 1:
        raise ConfigError("--grid train.seed=... and --seeds > 1 both set the seed; use one of them")
    base = load_config(config_path, list(overrides))
    name = name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = resolve_tracking_uri(base.tracking.uri)
    storage = base.storage.path
    if "://" not in storage:  # children run in other working directories (Ray tasks, job copies)
        storage = str(Path(storage).resolve())

    children = []
    for values in itertools.product(*(vals for _, vals in grid)):  # one empty tuple without a grid
        pairs = list(zip(keys, values))
        variant = ",".join(f"{key}={value}" for key, value in pairs) or "base"
        for offset in range(seeds):
            seed = base.train.seed + offset if "train.seed" not in keys else dict(pairs)["train.seed"]
            run_name = "-".join([name, *(_slug(v) for v in values), f"s{seed}"])
            child_overrides = [*overrides, *(f"{key}={_yaml_text(value)}" for key, value in pairs),
                               f"train.seed={seed}", f"tracking.uri={uri}", f"tracking.run_name={run_name}",
                               f"storage.path={storage}"]
            try:
                config = load_config(config_path, child_overrides)
            except ConfigError as err:
                raise ConfigError(f"variant {variant}: {err}") from None
            flat = config.flat()  # the label as the child's params will show it (1e-3 -> 0.001)
            label = ",".join(f"{key}={flat[key]}" for key in keys) or "base"
            children.append(Child(label, seed, run_name, config))
    return SweepPlan(name=name, config_path=str(config_path), grid=grid,
                     seeds=tuple(base.train.seed + i for i in range(seeds)), overrides=tuple(overrides),
                     tracking_uri=uri, experiment=base.tracking.experiment, children=tuple(children))


def _yaml_text(value: Any) -> str:
    """A parsed scalar back as ``--set`` text that parses to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


# ----------------------------------------------------------------------------------------------
# how many children at once


def run_demand(config: Config, cluster_cpus: float) -> dict[str, float]:
    """Logical resources one run holds while it trains: its Train workers and its embedding pool."""
    workers = config.train.num_workers
    demand = {"CPU": workers * cpus_per_worker(config, cluster_cpus)
              + config.refresh.pool_size * config.refresh.num_cpus}
    gpus = gpu_demand(config)
    if gpus:
        demand["GPU"] = gpus
    return demand


def parallel_capacity(config: Config, cluster: dict[str, float]) -> int:
    """How many runs of ``config`` fit in the cluster's resources at once (at least 1).

    Each run is counted with its whole demand, so concurrent runs never wait on each other's
    half-acquired resources. An autoscaling cluster reports only the nodes it has now: pass
    ``--max-parallel`` to count on nodes it will add.
    """
    demand = run_demand(config, float(cluster.get("CPU", 0)))
    fits = [math.floor(cluster.get(res, 0.0) / need + 1e-9) for res, need in demand.items() if need > 0]
    return max(1, min(fits, default=1))


def _concurrency_safe(uri: str) -> bool:
    """Whether several runs may write this MLflow store at once (a server, not a sqlite file)."""
    return not uri.startswith(("sqlite:", "file:")) and "://" in uri


# ----------------------------------------------------------------------------------------------
# running


def _default_runner(config: Config, config_path: Optional[str], parent_run_id: Optional[str]):
    from pipelines.run import run

    return run(config, config_path=config_path, parent_run_id=parent_run_id)


def run_sweep(plan: SweepPlan, max_parallel: Optional[int] = None, runner: Optional[Runner] = None) -> SweepResult:
    """Run every child of ``plan`` under one parent MLflow run; see the module docstring.

    Args:
        plan: from :func:`plan_sweep`.
        max_parallel: children at once; default 1 on a local Ray, and on a cluster (``RAY_ADDRESS``)
            as many as its current resources hold. More than 1 needs an MLflow server as the store.
        runner: ``runner(config, config_path, parent_run_id) -> RunResult``; default
            :func:`pipelines.run.run` (tests pass a stand-in).
    """
    from mlflow.tracking import MlflowClient

    if max_parallel is not None and max_parallel < 1:  # before the parent run exists
        raise ConfigError(f"--max-parallel {max_parallel}: must be at least 1")
    try:
        check_tracking_server(plan.tracking_uri)  # before the parent run, in one line
    except ValueError as err:
        raise ConfigError(f"tracking.uri = {plan.tracking_uri!r}: {err}") from None
    runner = runner or _default_runner
    client = MlflowClient(plan.tracking_uri)
    parent_id = _start_parent(client, plan)
    result = SweepResult(parent_run_id=parent_id, tracking_uri=plan.tracking_uri)
    status = "FAILED"
    try:
        limit = _resolve_parallel(plan, max_parallel)
        _print(f"sweep {plan.name}: {len(plan.children)} runs ({len(plan.children) // len(plan.seeds)} variants "
               f"x {len(plan.seeds)} seeds), {limit} at a time; parent run {parent_id}")
        if limit == 1:
            _run_sequential(plan, parent_id, runner, result, client)
        else:
            _run_parallel(plan, parent_id, runner, result, client, limit)
        status = "FINISHED" if not result.failed else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.log_metric(parent_id, "sweep/finished_runs", len(result.finished))
        client.log_metric(parent_id, "sweep/failed_runs", len(result.failed))
        client.set_terminated(parent_id, status=status)
    _print(f"sweep {plan.name}: {len(result.finished)} finished, {len(result.failed)} failed")
    for child, error in result.failed:
        _print(f"  failed: {child.run_name}: {error}")
    _print(f"compare them: hardbatch compare --experiment {plan.experiment} --sweep {parent_id}")
    return result


def _start_parent(client, plan: SweepPlan) -> str:
    experiment_id = experiment_id_for(client, plan.experiment, plan.tracking_uri)
    tags = {KIND_TAG: "sweep", GRID_TAG: ",".join(key for key, _ in plan.grid)}
    run = client.create_run(experiment_id, run_name=plan.name, tags=tags)
    params = {"sweep.config": plan.config_path, "sweep.seeds": ",".join(map(str, plan.seeds)),
              "sweep.runs": len(plan.children), "sweep.overrides": " ".join(plan.overrides) or "-"}
    params.update({f"sweep.grid.{key}": ",".join(map(str, values)) for key, values in plan.grid})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def _resolve_parallel(plan: SweepPlan, max_parallel: Optional[int]) -> int:
    wanted = max_parallel
    if wanted is None:
        if not os.environ.get("RAY_ADDRESS"):
            return 1
        import ray

        from pipelines.run import init_ray

        init_ray(plan.children[0].config)
        wanted = min(parallel_capacity(child.config, ray.cluster_resources()) for child in plan.children)
    limit = min(wanted, len(plan.children))
    if limit > 1 and not _concurrency_safe(plan.tracking_uri):
        _print(f"running one at a time: {plan.tracking_uri} must not be written by concurrent runs "
               "(point tracking.uri or MLFLOW_TRACKING_URI at an MLflow server to run in parallel)")
        return 1
    return limit


def _record(client, result: SweepResult, child: Child, outcome: Any) -> None:
    result.finished.append((child, outcome))
    client.set_tag(outcome.run_id, VARIANT_TAG, child.variant)
    client.set_tag(outcome.run_id, SEED_TAG, str(child.seed))


def _run_sequential(plan: SweepPlan, parent_id: str, runner: Runner, result: SweepResult, client) -> None:
    for index, child in enumerate(plan.children, 1):
        _print(f"[{index}/{len(plan.children)}] {child.variant} seed {child.seed}: run {child.run_name}")
        try:
            outcome = runner(child.config, plan.config_path, parent_id)
        except Exception as err:  # one failed variant must not cost the others
            result.failed.append((child, f"{type(err).__name__}: {err}"))
            continue
        _record(client, result, child, outcome)


def _run_parallel(plan: SweepPlan, parent_id: str, runner: Runner, result: SweepResult, client,
                  limit: int) -> None:
    """At most ``limit`` children at once, each the driver of its run inside a Ray task.

    The task itself holds no resources (``num_cpus=0``); its run's Train workers and embedding pool
    ask for theirs, and ``limit`` keeps the total within the cluster.
    """
    import ray

    remote = ray.remote(num_cpus=0, max_retries=0)(runner)
    queue, pending = list(plan.children), {}
    while queue or pending:
        while queue and len(pending) < limit:
            child = queue.pop(0)
            _print(f"start {child.variant} seed {child.seed}: run {child.run_name}")
            pending[remote.remote(child.config, plan.config_path, parent_id)] = child
        done, _ = ray.wait(list(pending), num_returns=1)
        child = pending.pop(done[0])
        try:
            outcome = ray.get(done[0])
        except Exception as err:
            result.failed.append((child, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
            continue
        _record(client, result, child, outcome)
        _print(f"done {child.variant} seed {child.seed}")
