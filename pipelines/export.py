"""The trained encoder as a product: every run logs it to MLflow, ``hardbatch export`` writes it as
one file, ``hardbatch embed`` writes the embeddings of any source as parquet.

    hardbatch export --run RUN_ID --out DIR [--which final|best] [--format export|torchscript]
    hardbatch embed --run RUN_ID --source images:/data/pets --out DIR [--which final|best] [--batch-size N]

    import mlflow
    encoder = mlflow.pytorch.load_model("runs:/RUN_ID/encoder")   # x [B, C, H, W] in [0, 1] -> h [B, D]

What a run logs (:func:`log_encoders`, called by :func:`pipelines.run.run` once training has finished):
the representation ``x -> h`` (:class:`trainers.models.Encoder`: no projector, no head) of the last
checkpoint as the MLflow model ``encoder`` and, when the run kept a best epoch (``<run>/best``), of
that epoch as ``encoder_best``. Each is serialised with ``torch.export`` (MLflow's ``pt2`` format: no
pickle, loadable without hardbatch, the batch dimension dynamic) with a tensor signature, two real
training samples as its input example, the run's metrics at its step, and as metadata
(``metadata["hardbatch"]``) the encoder card (:func:`trainers.models.encoder_card`), the network spec
hardbatch rebuilds the eager module from, and which epoch it is.

MLflow 3.17 behaviours this module works around (read in ``mlflow/models/model.py``,
``mlflow/tracking/fluent.py``, ``mlflow/pytorch/__init__.py`` and
``mlflow/store/artifact/runs_artifact_repo.py``, and measured):

* ``log_model(run_id=...)`` outside an active run creates the LoggedModel in the *active* experiment
  (the default one, its artifacts under ``./mlruns`` of the working directory), not in the run's;
  ``runs:/<id>/encoder`` searches the run's experiment and then finds nothing. The run's experiment
  is made active first.
* Without ``pip_requirements`` MLflow infers them by loading the model in a subprocess: 6.6 s per
  model here, against 0.5 s (small CNN) to 2 s (ResNet-18) for the whole log with them given.
* ``log_model(run_id=...)`` links the run's metrics at the model's step to the model by fetching the
  whole history of every metric key of the run: one request per key and model, each history in full.
  Against a server with basic authentication (a password hash checked per request, about 0.3 s each on
  this machine) that made logging two encoders take 31 s after a 2-epoch run, and it grows with the
  run's length. So the model is created with ``source_run_id`` (which ``runs:/`` resolves by), logged
  by its ``model_id`` without a run, and linked here: one ``log_outputs`` and one ``log_batch`` of the
  metrics at its step, read from the run's own record (``metrics.jsonl``).
* ``runs:/<id>/NAME`` resolves a *run artifact* ``NAME`` before a logged model of that name: nothing
  else may be logged under ``encoder`` or ``encoder_best`` in the run's artifacts.
* The loaded model is a ``torch.fx.GraphModule`` exported in inference mode; its ``.eval()`` raises
  ("Calling eval() is not supported yet") and is not needed.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

ENCODER_MODELS = {"final": "encoder", "best": "encoder_best"}  # --which -> the MLflow model's name
META_KEY = "hardbatch"  # the key of the logged model's metadata that holds ours
EXAMPLE_ROWS = 2  # torch.export fixes a dimension of size 1: the example's batch must be larger
FORMATS = {"export": "encoder.pt2", "torchscript": "encoder.pt"}  # --format -> the file written
CARD_FILE = "encoder.json"
MAX_THREADS = 8  # torch threads of one CPU embedding actor


class ExportError(ValueError):
    """A problem with the request (run, model, source, output), found before Ray starts; one line."""


# ----------------------------------------------------------------------------------------------
# logging (the end of every run)


def _signature(card: dict[str, Any]):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    shape = tuple(int(d) for d in card["input"]["shape"])
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(card["embedding_dim"])))]))


def _plain_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A network spec as plain JSON (tuples as lists), as :func:`trainers.models.load_network` reads it."""
    return json.loads(json.dumps(spec))


def log_encoder(net, spec: dict[str, Any], which: str, run_id: str, example: np.ndarray, step: int,
                info: Optional[dict[str, Any]] = None, params: Optional[dict[str, str]] = None,
                metrics: Optional[dict[str, tuple[float, int]]] = None) -> str:
    """Log the encoder of ``net`` (a network of :func:`trainers.models.build_network`) to run
    ``run_id`` as the MLflow model ``ENCODER_MODELS[which]``; returns its model id.

    The tracking URI and the run's experiment must be the active ones (:func:`log_encoders`), and no
    run active in this process.

    Args:
        net: the trained network (its projector or head is not logged).
        spec: its network spec.
        which: ``final`` or ``best``.
        run_id: the MLflow run.
        example: ``float32 [EXAMPLE_ROWS, *x_shape]`` in [0, 1], real samples.
        step: the training step of these weights (the run's metrics at that step are linked to the model).
        info: more metadata (epoch, the metric a best epoch was chosen by, ...).
        params: the run's parameters, copied to the model (as ``log_model(run_id=...)`` copies them).
        metrics: ``{key: (value, timestamp_ms)}``, the run's metrics at ``step``, linked to the model.
    """
    import mlflow
    import torch
    from mlflow.entities import LoggedModelOutput, Metric

    from trainers.models import Encoder, encoder_card

    encoder = Encoder(net).eval().requires_grad_(False)
    card = encoder_card(spec)
    meta = {META_KEY: {"card": card, "network": _plain_spec(spec), "which": which, **(info or {})}}
    # Not log_model(run_id=...): see the module docstring.
    model = mlflow.initialize_logged_model(name=ENCODER_MODELS[which], source_run_id=run_id,
                                           params={k: str(v) for k, v in (params or {}).items()})
    mlflow.pytorch.log_model(
        encoder, name=ENCODER_MODELS[which], model_id=model.model_id, signature=_signature(card),
        input_example=np.ascontiguousarray(example, dtype=np.float32), metadata=meta,
        serialization_format="pt2", pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    client = mlflow.MlflowClient()
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=int(step))])
    if metrics:
        client.log_batch(run_id, metrics=[Metric(key, float(value), int(ts), int(step), run_id=run_id,
                                                 model_id=model.model_id)
                                          for key, (value, ts) in sorted(metrics.items())])
    return model.model_id


def metrics_at_steps(metrics_file: Path, steps: set[int]) -> dict[int, dict[str, tuple[float, int]]]:
    """``{step: {key: (value, timestamp_ms)}}`` of the metrics a run logged at ``steps``, from its
    record ``metrics.jsonl`` (:class:`trainers.tracking.Tracker`: every metric, with the timestamp it
    was sent to MLflow with); the newest line wins where a replayed step logged a key again."""
    from trainers.tracking import LINE_KEYS

    found: dict[int, dict[str, tuple[float, int]]] = {step: {} for step in steps}
    if not metrics_file.exists():
        return found
    with open(metrics_file) as lines:
        for text in lines:
            try:
                line = json.loads(text)
            except ValueError:  # a line cut short by a crash
                continue
            step = line.get("step")
            if step in found:
                found[step].update({key: (float(value), int(line["time_ms"])) for key, value in line.items()
                                    if key not in LINE_KEYS})
    return found


def example_rows(store, rows: int = EXAMPLE_ROWS) -> np.ndarray:
    """The first ``rows`` samples of a SampleStore as the encoder takes them (``float32``, images in [0, 1])."""
    ids = np.arange(rows) % max(store.size, 1)
    return np.ascontiguousarray(store.take(ids), dtype=np.float32)


def log_encoders(tracking_uri: str, run_id: str, final_dir: str | Path, best_dir: str | Path,
                 example: np.ndarray, metrics_file: Optional[Path] = None) -> dict[str, Any]:
    """Log a finished run's final encoder (from the checkpoint in ``final_dir``) and, when
    ``best_dir`` holds one (``network.json`` beside ``model.pt``), its best; see the module docstring.
    The run's metrics at each model's step (from ``metrics_file``, the run's ``metrics.jsonl``) are
    linked to that model.

    Returns:
        ``{"final": model_id, "best": model_id or None, "seconds": float}``.
    """
    import mlflow

    from trainers.models import NETWORK_FILE, load_network

    t0 = time.perf_counter()
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    # Not the default experiment: see the module docstring.
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    out: dict[str, Any] = {"final": None, "best": None}
    found = {}
    for which, directory in (("final", Path(final_dir)), ("best", Path(best_dir))):
        if (directory / NETWORK_FILE).exists():
            meta_file = directory / "meta.json"
            found[which] = (directory, json.loads(meta_file.read_text()) if meta_file.exists() else {})
    steps = {meta.get("step") or 0 for _, meta in found.values()}
    metrics = metrics_at_steps(Path(metrics_file), steps) if metrics_file else {}
    for which, (directory, meta) in found.items():
        info = {"epoch": int(meta["epoch"]) + 1 if "epoch" in meta else None, "step": meta.get("step")}
        if which == "best":
            info.update(metric=meta.get("metric"), value=meta.get("value"))
        net, spec = load_network(directory)
        step = meta.get("step") or 0
        out[which] = log_encoder(net, spec, which, run_id, example, step, info, params=run.data.params,
                                 metrics=metrics.get(step))
    out["seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------------------------
# finding and loading a logged encoder


@dataclass(frozen=True)
class LoggedEncoder:
    """An encoder a run logged: where it is, and what it is.

    Attributes:
        run_id, run_name: the run.
        which: ``final`` or ``best``.
        model_id: the MLflow LoggedModel id (``models:/<model_id>`` loads it).
        tracking_uri: the MLflow store.
        meta: ``metadata["hardbatch"]``: ``card``, ``network``, ``which``, ``epoch``, ``step``, ...
    """

    run_id: str
    run_name: str
    which: str
    model_id: str
    tracking_uri: str
    meta: dict[str, Any]

    @property
    def card(self) -> dict[str, Any]:
        return self.meta["card"]

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_id}"

    @property
    def run_uri(self) -> str:
        return f"runs:/{self.run_id}/{ENCODER_MODELS[self.which]}"


def check_store(tracking_uri: str) -> None:
    """An MLflow store that can be read: a sqlite file that exists (MLflow would create an empty
    one), an http(s) server that answers. Raises :class:`ExportError`."""
    from trainers.tracking import check_tracking_server

    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not Path(tracking_uri[len(prefix):]).is_file():
        raise ExportError(f"no MLflow store at {tracking_uri[len(prefix):]} (--tracking-uri, or "
                          f"$MLFLOW_TRACKING_URI, or run this from the folder that holds mlflow.db)")
    try:
        check_tracking_server(tracking_uri)
    except ValueError as err:
        raise ExportError(f"--tracking-uri {tracking_uri}: {err}") from None


def find_encoder(tracking_uri: str, run_id: str, which: str = "final") -> LoggedEncoder:
    """The encoder ``which`` that run ``run_id`` logged. O(models the run logged) MLflow calls.

    Raises:
        ExportError: no such run; a run that logged no encoder (it did not finish training, or it
            predates encoder logging); ``which="best"`` for a run without a best epoch.
    """
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    check_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        reason = str(err).splitlines()[0][:160]
        raise ExportError(f"run {run_id!r} not found in {tracking_uri} ({reason})") from None
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    models = [client.get_logged_model(out.model_id) for out in outputs]
    ready = {m.name: m for m in sorted(models, key=lambda m: m.creation_timestamp)
             if m.status == LoggedModelStatus.READY}  # the newest of a name wins
    name = ENCODER_MODELS[which]
    where = f"run {run_id} ({run.info.run_name}, {run.info.status})"
    if name not in ready:
        if which == "best" and ENCODER_MODELS["final"] in ready:
            raise ExportError(f"{where} has no best encoder: no epoch reported eval/accuracy, eval/retrieval_acc "
                              f"or eval/knn_acc (an unlabelled source); --which final takes the last epoch's")
        if run.info.status != "FINISHED":
            why = "it is still running" if run.info.status == "RUNNING" else "it did not finish training"
        else:
            why = "it predates encoder logging, or logging it failed (its console said why)"
        raise ExportError(f"{where} has no logged encoder: {why}; its checkpoints hold the weights "
                          f"(trainers.models.load_network)")
    model = ready[name]
    try:
        with tempfile.TemporaryDirectory(prefix="hardbatch-mlmodel-") as tmp:
            mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_location.rstrip('/')}/MLmodel",
                                                          dst_path=tmp, tracking_uri=tracking_uri)
            meta = (Model.load(mlmodel).metadata or {}).get(META_KEY)
    except (MlflowException, OSError) as err:
        raise ExportError(f"{where}: its model {name!r} cannot be read ({str(err).splitlines()[0][:160]})") from None
    if not meta or "network" not in meta:
        raise ExportError(f"{where}: its model {name!r} was not logged by hardbatch (no metadata[{META_KEY!r}])")
    return LoggedEncoder(run_id, run.info.run_name, which, model.model_id, tracking_uri, meta)


def encoder_from_state(meta: dict[str, Any], state: dict[str, Any]):
    """The eager :class:`trainers.models.Encoder` of a logged encoder's network spec, with weights
    ``state`` (strictly: every tensor present, nothing more), in inference mode."""
    from trainers.models import Encoder, build_network

    spec = dict(meta["network"])
    spec["x_shape"] = tuple(spec["x_shape"])
    spec["v_shape"] = None if spec.get("v_shape") is None else tuple(spec["v_shape"])
    encoder = Encoder(build_network(spec))
    encoder.load_state_dict(state, strict=True)
    return encoder.eval().requires_grad_(False)


def load_encoder(model_uri: str, tracking_uri: Optional[str] = None):
    """The eager encoder and its metadata from an MLflow model URI (``models:/<id>``,
    ``runs:/<run>/encoder``, or a downloaded model folder).

    The MLflow model's weights are its exported program's state dict, whose names are the module's
    own: the network is rebuilt from the spec in the metadata and loaded strictly, so the result is
    the module that was trained (free to move to a GPU, script or re-export).

    Returns:
        ``(encoder, meta)``. Cost: one download of the model (from a local store: a copy).
    """
    import mlflow
    from mlflow.models import Model

    if model_uri.startswith("models:/m-") and "/" not in model_uri[len("models:/"):]:
        # a LoggedModel id; MLflow 3.17 resolves ``models:/<id>`` against the global tracking URI,
        # whatever ``tracking_uri`` says (in a Ray worker: a default store in the worker's cwd)
        model_uri = mlflow.MlflowClient(tracking_uri).get_logged_model(model_uri[len("models:/"):]).artifact_location
    with tempfile.TemporaryDirectory(prefix="hardbatch-encoder-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp, tracking_uri=tracking_uri)
        meta = (Model.load(local).metadata or {})[META_KEY]
        graph = mlflow.pytorch.load_model(local)
        return encoder_from_state(meta, graph.state_dict()), meta


# ----------------------------------------------------------------------------------------------
# hardbatch export


def export_encoder(encoder, meta: dict[str, Any], out_dir: str | Path, fmt: str = "export",
                   about: Optional[dict[str, Any]] = None) -> tuple[Path, Path]:
    """Write ``encoder`` to ``out_dir`` as ``encoder.pt2`` (``torch.export``, batch dimension dynamic;
    load with ``torch.export.load(path).module()``) or ``encoder.pt`` (TorchScript, scripted; load with
    ``torch.jit.load(path)``), and ``encoder.json``: the encoder card plus ``about`` (run id, ...).

    Returns:
        ``(model file, encoder.json)``.
    """
    import warnings

    import torch

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = meta["card"]
    target = out / FORMATS[fmt]
    if fmt == "export":
        example = torch.rand(EXAMPLE_ROWS, *card["input"]["shape"], generator=torch.Generator().manual_seed(0))
        program = torch.export.export(encoder, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        torch.export.save(program, target)
        load = f"torch.export.load({FORMATS[fmt]!r}).module()"
    else:
        with warnings.catch_warnings():  # torch 2.15 deprecates TorchScript; it is what was asked for
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.script(encoder).save(str(target))
        load = f"torch.jit.load({FORMATS[fmt]!r})"
    trained = {k: meta[k] for k in ("epoch", "step", "metric", "value") if meta.get(k) is not None}
    doc = {**card, **(about or {}), **trained, "format": fmt, "file": target.name, "load": load,
           "torch_version": torch.__version__}
    card_file = out / CARD_FILE
    card_file.write_text(json.dumps(doc, indent=1) + "\n")
    return target, card_file


def check_out(path: str, empty: bool) -> Path:
    """``--out``: a directory this process can create or write into, before anything is taken.

    Probed with a temporary file in the nearest existing folder (removed at once), so a read-only
    file system or a missing permission is found even for root.

    Args:
        empty: the folder must not exist or be empty (``embed`` writes a dataset there).
    """
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {path}: is a file, not a folder")
    if empty and out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {path}: the folder is not empty; choose a new one (the embeddings are a "
                          f"parquet dataset of several files)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"--out {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ExportError(f"--out {path}: cannot write in {existing} ({err.strerror})") from None
    return out


def _about(logged: LoggedEncoder) -> dict[str, Any]:
    return {"run_id": logged.run_id, "run_name": logged.run_name, "which": logged.which,
            "model_uri": logged.run_uri, "model_id": logged.model_id, "tracking_uri": logged.tracking_uri}


def main_export(args) -> int:
    """The ``hardbatch export`` subcommand body (``args`` from :mod:`pipelines.cli`)."""
    from trainers.progress import quiet_logging
    from trainers.tracking import resolve_tracking_uri

    quiet_logging()
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        logged = find_encoder(uri, args.run, args.which)
        out = check_out(args.out, empty=False)
        encoder, meta = load_encoder(logged.model_uri, uri)
        target, card_file = export_encoder(encoder, meta, out, args.format, _about(logged))
    except ExportError as err:
        print(f"hardbatch: {err}", file=sys.stderr)
        return 2
    card = logged.card
    _say(f"exported the {logged.which} encoder of run {logged.run_id} ({card['backbone']}, "
         f"input {'x'.join(str(d) for d in card['input']['shape'])} float32 in [0, 1] -> {card['embedding_dim']} "
         f"features) as {args.format}: {target}")
    _say(f"its card: {card_file}")
    return 0


# ----------------------------------------------------------------------------------------------
# hardbatch embed


def _run_params(tracking_uri: str, run_id: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id).data.params


def prepare_source(spec: str, card: dict[str, Any], options: dict[str, Any]):
    """List ``spec`` (no Ray) as one split of every item, decoded to the encoder's input shape.

    Raises:
        ExportError: a source that cannot be read, or whose samples are not what the encoder takes.
    """
    from pipelines.datasets import prepare_data
    from pipelines.sources import SourceError

    shape = [int(d) for d in card["input"]["shape"]]
    data = {"source": spec, "test_fraction": 0.0, "split_seed": 0, **options}
    if len(shape) == 3:
        data["image_size"] = shape[1]  # images are decoded to the side the encoder was trained on
    try:
        prepared = prepare_data(data, {"max_samples": None})
    except (SourceError, ValueError) as err:
        message = str(err).splitlines()[0]
        raise ExportError(f"--source {message if message.startswith(spec) else f'{spec}: {message}'}") from None
    if prepared.sizes["train"] == 0:
        raise ExportError(f"--source {spec}: no samples")
    got = list(prepared.sample_shape)
    if got != shape:
        raise ExportError(f"--source {spec}: its samples decode to {'x'.join(map(str, got))}, the encoder takes "
                          f"{'x'.join(map(str, shape))}")
    return prepared


def embed_pool(cluster: dict[str, float], requested: Optional[int] = None) -> dict[str, Any]:
    """The actor pool of an embedding pass on a Ray with resources ``cluster``.

    With GPUs: one actor per GPU (``num_gpus=1``). Without: actors of up to :data:`MAX_THREADS` torch
    threads, as many as the CPUs hold (bench/embed.py: on 2 cores one actor with 2 threads matched a
    bare loop, two single-threaded actors ran at 0.77x); each asks for 3/4 of its threads' CPUs, so
    the small remainder leaves room for the tasks that write the parquet files.
    """
    gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
    if gpus:
        return {"pool_size": requested or gpus, "num_gpus": 1.0, "num_cpus": 1.0, "threads": None, "device": "cuda"}
    threads = min(cpus, MAX_THREADS) if requested is None else max(1, cpus // requested)
    size = requested or max(1, cpus // threads)
    return {"pool_size": size, "num_gpus": 0.0, "num_cpus": 0.75 * threads, "threads": threads, "device": "cpu"}


def main_embed(args) -> int:
    """The ``hardbatch embed`` subcommand body (``args`` from :mod:`pipelines.cli`)."""
    from trainers.progress import quiet_logging
    from trainers.tracking import resolve_tracking_uri

    quiet_logging()
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        if args.batch_size < 1:
            raise ExportError(f"--batch-size {args.batch_size}: must be at least 1")
        logged = find_encoder(uri, args.run, args.which)
        params = _run_params(uri, args.run)
        options = {"image_column": args.image_column or params.get("data.image_column") or "image",
                   "label_column": args.label_column or _none(params.get("data.label_column")),
                   "s3_endpoint": _none(params.get("data.s3_endpoint"))}
        out = check_out(args.out, empty=True)
        prepared = prepare_source(args.source, logged.card, options)
    except ExportError as err:
        print(f"hardbatch: {err}", file=sys.stderr)
        return 2
    result = embed_source(prepared, logged, out, batch_size=args.batch_size)  # Ctrl-C: see pipelines.cli
    _say(f"embedded {result['rows']} samples of {args.source} with the {logged.which} encoder of run "
         f"{logged.run_id} in {result['seconds']:.1f} s ({result['rows'] / max(result['seconds'], 1e-9):.0f} rows/s, "
         f"{result['pool']}): {out}")
    if result["undecodable"]:
        _say(f"{result['undecodable']} samples could not be decoded: their embedding is NaN, the column error says why")
    return 0


def _none(value: Optional[str]) -> Optional[str]:
    return None if value in (None, "", "None", "null") else value


def embed_source(prepared, logged: LoggedEncoder, out: Path, batch_size: int = 256,
                 pool_size: Optional[int] = None) -> dict[str, Any]:
    """Start (or join) Ray, read the prepared source into a SampleStore and write its embeddings
    to ``out`` (:func:`pipelines.embed.embed_to_parquet`); returns rows, seconds and the pool.

    The pool's actors load the encoder from MLflow themselves (a restarted actor rebuilds itself),
    so this process never imports torch. The pass is driven from a zero-CPU task, as a graph refresh
    is from its actor: Ray's lines about the pool's own actors then reach this console as forwarded
    lines, which :func:`pipelines.console.drop_harmless_worker_lines` filters.
    """
    import ray

    from pipelines.config import Config
    from pipelines.datasets import build_stores
    from pipelines.embed import embed_to_parquet
    from pipelines.run import init_ray

    init_ray(Config())
    with tempfile.TemporaryDirectory(prefix="hardbatch-embed-") as tmp:
        t0 = time.perf_counter()
        splits = build_stores(prepared, "auto", Path(tmp, "store"))
        pool = embed_pool(ray.cluster_resources(), pool_size)
        driver = ray.remote(num_cpus=0, max_retries=0)(embed_to_parquet)
        info = ray.get(driver.remote(splits.train, logged.model_uri, str(out), tracking_uri=logged.tracking_uri,
                                     batch_size=batch_size, **pool))
        seconds = time.perf_counter() - t0
    about = {**_about(logged), "source": prepared.sources["train"].spec, "rows": info["rows"],
             "columns": info["columns"], "card": logged.card}
    (out / "_hardbatch.json").write_text(json.dumps(about, indent=1) + "\n")
    return {**info, "seconds": seconds, "pool": f"{pool['pool_size']} actor(s) on {pool['device']}"}


def _say(message: str) -> None:
    from pipelines.console import say

    say(message)
