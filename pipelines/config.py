"""One typed, frozen configuration for a hardbatch job.

A job is described by a YAML file plus ``--set a.b=c`` overrides. Both are merged, validated by the
pydantic models below, and frozen; the driver then computes the derived quantities (per-worker batch,
CPUs per worker, steps per epoch) once and logs them beside the config.

Every bad input becomes a :class:`ConfigError` whose message names the field, the value and what is
allowed, so the CLI can print one line without a traceback, before Ray is started.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines import sources


class ConfigError(ValueError):
    """A configuration problem a user can fix; its message is meant to be printed as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataConfig(_Section):
    source: str = Field("builtin:digits", description=(
        "dataset: " + ", ".join(sources.BUILTIN_NAMES) + ", images:PATH (a folder; class sub-folders give labels), "
        "parquet:PATH (a file, folder or glob); PATH local, file://, s3:// or gs://"))
    test_source: Optional[str] = Field(
        None, description="held-out data of the same form (images:PATH or parquet:PATH) instead of a test_fraction split")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out fraction for evaluation")
    split_seed: int = Field(0, ge=0, description="seed of the fixed held-out split")
    num_samples: int = Field(4000, ge=10, description="generated sources: number of pairs")
    dim: int = Field(8, ge=1, description="generated:gaussian: dimension of u and of v")
    seed: int = Field(0, ge=0, description="generated sources: seed of the data")
    image_column: str = Field("image", min_length=1, description=(
        "parquet: the column of encoded image bytes or of a fixed-shape numeric tensor"))
    label_column: Optional[str] = Field(None, description="parquet: the column of labels (integers or strings); none: unlabelled")
    image_size: Optional[int] = Field(None, ge=4, le=4096, description=(
        "side images are resized (shorter side) and centre-cropped to on decode; default: the first image's "
        "shorter side, at most 224"))
    s3_endpoint: Optional[str] = Field(None, description=(
        "S3-compatible endpoint URL for s3:// paths (default $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)"))
    store: Literal["auto", "object_store", "disk"] = Field("auto", description=(
        "where the SampleStore keeps the stored samples; auto: the object store when they take at most half of it, "
        "else memory-mapped files under the run's storage path"))
    feed_workers: Optional[int] = Field(None, ge=0, description=(
        "decode/augment processes per train worker; default: the worker's CPUs - 1, at least 1; 0: in the worker, no overlap"))
    feed_prefetch: int = Field(4, ge=1, description="batches each train worker prepares ahead of the step")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        sources.check_source(value)
        return value

    @field_validator("test_source")
    @classmethod
    def _user_test_source(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not sources.source_class(value).user_data:
            raise ValueError("must be images:PATH or parquet:PATH (the built-in sources are split by test_fraction)")
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _an_endpoint(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be a URL such as http://127.0.0.1:9000 or https://s3.example.com")
        return value

    @model_validator(mode="after")
    def _keys_of_the_source(self) -> "DataConfig":
        kind = sources.source_class(self.source)
        test_kind = sources.source_class(self.test_source) if self.test_source else None
        if self.source not in sources.GENERATED:
            for key in ("num_samples", "dim", "seed"):
                if key in self.model_fields_set:
                    raise ValueError(f"data.{key} applies to generated sources "
                                     f"({', '.join(sorted(sources.GENERATED))}), not to {self.source!r}")
        parquet = sources.ParquetSource in (kind, test_kind)
        for key in ("image_column", "label_column"):
            if key in self.model_fields_set and not parquet:
                raise ValueError(f"data.{key} applies to parquet:PATH sources, not to {self.source!r}")
        for key in ("image_size", "s3_endpoint"):
            if key in self.model_fields_set and not kind.user_data:
                raise ValueError(f"data.{key} applies to images:PATH and parquet:PATH sources, not to {self.source!r}")
        if self.test_source:
            if not kind.user_data:
                raise ValueError(f"data.test_source applies to images:PATH and parquet:PATH sources, not to {self.source!r}")
            if "test_fraction" in self.model_fields_set:
                raise ValueError("data.test_source and data.test_fraction both set the held-out data; give one "
                                 "(remove data.test_fraction from the config file, or drop data.test_source)")
        return self

    def source_params(self) -> dict[str, Any]:
        """Keyword arguments of :func:`pipelines.sources.load_source` for this source."""
        if self.source in sources.GENERATED:
            return {"num_samples": self.num_samples, "dim": self.dim, "seed": self.seed}
        return {}

    def make_sources(self) -> list[sources.Source]:
        """The source objects of ``source`` and ``test_source`` (when given)."""
        options = {"image_column": self.image_column, "label_column": self.label_column,
                   "s3_endpoint": self.s3_endpoint, "num_samples": self.num_samples, "dim": self.dim, "seed": self.seed}
        return [sources.make_source(spec, **options) for spec in (self.source, self.test_source) if spec]


class AugmentConfig(_Section):
    preset: Literal["auto", "digits", "natural"] = Field("auto", description=(
        "views: digits (crop, affine, noise; no flips), natural (SimCLR: resized crop, flip, colour jitter, "
        "grayscale); auto: digits for 1-channel images (builtin:digits), natural otherwise"))
    blur: bool = Field(False, description="natural: add a Gaussian blur with p 0.5 (SimCLR's ImageNet recipe)")
    crop_min: float = Field(0.08, gt=0.0, le=1.0, description=(
        "natural: the smallest random crop, as a fraction of the image's area (SimCLR: 0.08); raise it where "
        "the object fills little of the image, or a view may miss it (configs/shapes.yaml: 0.35)"))


class ModelConfig(_Section):
    backbone: Literal["small_cnn", "resnet18", "resnet50", "vit_b_16"] = Field(
        "small_cnn", description="image encoder: small_cnn (3 conv stages), or torchvision's resnet18, resnet50, "
                                 "vit_b_16 (random init)")
    cifar_stem: Optional[bool] = Field(
        None, description="resnets: 3x3 stride-1 first conv, no max-pool (SimCLR's CIFAR variant); default: on for "
                          "images of 64 px or less")
    width: int = Field(32, ge=4, description="small_cnn: channels of the first conv layer (doubled twice)")
    embed_dim: Optional[int] = Field(
        None, ge=2, description="representation size (encoder output); default 128, or the backbone's feature width "
                                "(resnet18 512, resnet50 2048, vit_b_16 768)")
    proj_hidden: Optional[int] = Field(
        None, ge=2, description="hidden units of the MLP projector; default: the backbone's feature width "
                                "(small_cnn: 2 x embed_dim)")
    proj_dim: int = Field(64, ge=2, description="output size of the projector (loss space)")

    @model_validator(mode="after")
    def _sizes_of_the_backbone(self) -> "ModelConfig":
        from trainers.models import config_problem

        problem = config_problem(self.model_dump())
        if problem:
            raise ValueError(problem)
        return self


class TrainConfig(_Section):
    epochs: int = Field(20, ge=1, description="passes over the training split")
    batch_size: int = Field(128, ge=2, description="global batch size (all workers together)")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (gloo DDP on CPU)")
    cpus_per_worker: Optional[float] = Field(
        None, gt=0, description="logical CPUs per worker; default: what is left after the embed pool, at most 1")
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL)")
    lr: float = Field(2e-3, gt=0, description="base learning rate for the global batch (AdamW)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    warmup_epochs: float = Field(1.0, ge=0, description="linear learning-rate warm-up, then cosine decay")
    seed: int = Field(0, ge=0, description="seed of the model, the augmentations and the batch plans")
    log_every_steps: int = Field(5, ge=1, description="MLflow/progress logging period in steps")
    max_failures: int = Field(1, ge=0, description="worker-group restarts Ray Train may attempt")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of the forward pass (the losses always compute in fp32); fp16 needs "
                            "train.use_gpu and adds a gradient scaler; bf16 runs on CPUs and GPUs")
    channels_last: bool = Field(False, description="images and conv weights in NHWC memory layout (faster convs on "
                                                   "GPUs with tensor cores)")
    compile: bool = Field(False, description="torch.compile the network (a C compiler on the workers; the first "
                                             "steps are slower while it compiles)")


LOSS_NAMES = ("infonce", "soft_infonce", "sscl", "mveb", "clip", "conditional", "joint")
BIMODAL_LOSSES = frozenset({"clip", "conditional", "joint"})  # two towers on paired data


class MVEBTraining(_Section):
    """Training options that come with ``mveb`` (beside its loss hyper-parameters)."""

    ema_base: float = Field(0.996, ge=0.0, lt=1.0, description="EMA target momentum at the start (cosine schedule to 1)")


class SoftTargetTraining(_Section):
    """Training options that come with ``soft_infonce``."""

    targets: Literal["smoothing", "mixup"] = Field(
        "smoothing", description="soft targets: label smoothing (by `smoothing`) or batch mixup")
    mixup_alpha: float = Field(0.8, gt=0, description="mixup weight ~ Beta(alpha, alpha)")
    noise_from: Literal["train_frequencies", "uniform"] = Field(
        "train_frequencies", description="noise distribution q over the classes")


TRAINING_OPTIONS: dict[str, type[_Section]] = {"mveb": MVEBTraining, "soft_infonce": SoftTargetTraining}


class LossConfig(_Section):
    """``loss.name`` selects the loss; ``loss.<name>`` holds that loss's settings.

    Each ``loss.<name>`` section takes the constructor arguments of ``trainers.losses.LOSSES[name]``
    (``loss.sscl.tau_plus``, ``loss.infonce.temperature``, ...) plus the training options of
    :data:`TRAINING_OPTIONS`. Every section given is validated by building its loss once, before Ray
    starts, so a sweep over ``loss.name`` can carry each loss's settings in one file.
    """

    model_config = ConfigDict(extra="allow", frozen=True, validate_default=True)

    name: Literal[LOSS_NAMES] = Field("infonce", description="loss; its settings go under loss.<name>.*")

    @property
    def kind(self) -> str:
        """How the loss is trained: ``siamese``, ``ema`` (mveb), ``classifier`` or ``bimodal``."""
        if self.name in BIMODAL_LOSSES:
            return "bimodal"
        return {"mveb": "ema", "soft_infonce": "classifier"}.get(self.name, "siamese")

    def section(self, name: Optional[str] = None) -> dict[str, Any]:
        """The ``loss.<name>`` section as given (``{}`` when absent); default: the selected loss."""
        return dict((self.model_extra or {}).get(name or self.name) or {})

    def hyperparameters(self, name: Optional[str] = None) -> dict[str, Any]:
        """Constructor arguments of the loss class given in its section (defaults not filled in)."""
        name = name or self.name
        options = TRAINING_OPTIONS.get(name)
        skip = set(options.model_fields) if options else set()
        return {k: v for k, v in self.section(name).items() if k not in skip}

    def training(self, name: Optional[str] = None) -> Optional[_Section]:
        """The training options of a loss (defaults filled in), or ``None`` if it has none."""
        name = name or self.name
        options = TRAINING_OPTIONS.get(name)
        if options is None:
            return None
        return options.model_validate({k: v for k, v in self.section(name).items() if k in options.model_fields})

    def settings(self, name: Optional[str] = None) -> dict[str, Any]:
        """Every setting of a loss with its defaults filled in: the loss's constructor arguments,
        then its training options (``noise`` stays ``None`` here when the driver derives it)."""
        from trainers.losses import LOSSES

        name = name or self.name
        options = self.training(name)
        return {**LOSSES[name].params(), **self.hyperparameters(name), **(options.model_dump() if options else {})}

    @model_validator(mode="after")
    def _check_sections(self) -> "LossConfig":
        from trainers.losses import LOSSES  # torch, not Ray: validation stays Ray-free

        for name, section in (self.model_extra or {}).items():
            if name not in LOSS_NAMES:
                close = _closest(name, ["name", *LOSS_NAMES])
                hint = (f"did you mean 'loss.{close}'?" if close else
                        f"loss settings go under loss.<name> for a name in {', '.join(LOSS_NAMES)}, "
                        f"e.g. loss.infonce.temperature")
                raise ValueError(f"unknown config key 'loss.{name}'; {hint}")
            if section is None:
                continue
            if not isinstance(section, dict):
                raise ValueError(f"loss.{name} = {section!r}: must be a mapping of that loss's settings")
            cls, options = LOSSES[name], TRAINING_OPTIONS.get(name)
            option_keys = set(options.model_fields) if options else set()
            allowed = [*cls.params(), *sorted(option_keys)]
            for key in section:
                if key not in allowed:
                    close = _closest(str(key), allowed)
                    hint = f"did you mean 'loss.{name}.{close}'?" if close else f"valid: {', '.join(allowed)}"
                    raise ValueError(f"unknown config key 'loss.{name}.{key}'; {hint}")
            noise = section.get("noise")
            if noise is not None and not (isinstance(noise, list) and noise and all(
                    isinstance(q, (int, float)) and not isinstance(q, bool) for q in noise)):
                raise ValueError(f"loss.{name}.noise = {noise!r}: must be a list of class probabilities, "
                                 f"one per class, e.g. [0.1, 0.1, ...]")
            if "noise" in section and "noise_from" in section:
                raise ValueError(f"loss.{name}.noise and loss.{name}.noise_from both set the noise "
                                 "distribution; give one")
            try:
                cls.from_config(self.hyperparameters(name))
            except (TypeError, ValueError) as err:
                message = str(err)
                param = message.split(" ", 1)[0]
                if param in section:  # the loss names its argument first: "tau_plus must be in ..."
                    raise ValueError(f"loss.{name}.{param} = {section[param]!r}: "
                                     f"{message.split(' ', 1)[1]}") from None
                raise ValueError(f"loss.{name}: {message}") from None
            if options is not None:
                try:
                    self.training(name)
                except ValidationError as err:
                    first = err.errors()[0]
                    key = ".".join(str(p) for p in first["loc"])
                    raise ValueError(f"loss.{name}.{key} = {first.get('input')!r}: "
                                     f"{_must(first['msg'])}") from None
        return self


class SamplerConfig(_Section):
    name: Literal["rwr", "uniform", "knn"] = Field("rwr", description="how batches are drawn")
    k: int = Field(10, ge=1, description="out-degree of the proximity graph")
    m: int = Field(200, ge=2, description="uniformly drawn neighbour candidates per node")
    restart_prob: float = Field(0.2, description="random-walk restart probability, in [0, 1)")
    restart_decay: bool = Field(False, description="BatchSampler's per-epoch restart decay to 0.05")
    warmup_epochs: int = Field(0, ge=0, description="epochs of uniform batches before the graph is used")
    prefetch: int = Field(4, ge=1, description="plans each worker keeps requested ahead")

    @field_validator("restart_prob")
    @classmethod
    def _restart_in_range(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"must be in [0, 1) (a restart adds no node, so 1 never ends), got {value}")
        return value

    @model_validator(mode="after")
    def _k_below_m(self) -> "SamplerConfig":
        if self.k >= self.m:
            raise ValueError(f"sampler.k = {self.k} must be smaller than sampler.m = {self.m}")
        return self


class RefreshConfig(_Section):
    every_epochs: int = Field(5, ge=0, description="rebuild the graph every N epochs (0: never)")
    every_steps: int = Field(0, ge=0, description="rebuild every N steps instead, when > 0")
    scope: Literal["full", "seen"] = Field(
        "full", description="re-embed every sample, or only those seen since the last refresh (BatchSampler)")
    mode: Literal["async", "sync"] = Field(
        "async", description="async: keep training on the old graph until refresh.lag_steps later; sync: wait for "
                             "the new graph at the refresh step")
    lag_steps: Optional[int] = Field(
        None, ge=1, description="async: a graph built from the weights of step s is used from step s + lag_steps "
                                "(the trainer waits there if it is late); default: the refresh period; sync ignores it")
    pool_size: int = Field(1, ge=1, description="embedding actors in the Ray Data pool")
    num_cpus: float = Field(0.25, ge=0, description="logical CPUs per embedding actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per embedding actor")
    batch_size: int = Field(512, ge=1, description="rows per map_batches call")
    final_wait_s: float = Field(
        300.0, ge=0, description="at the end of training, how long to wait for a refresh still running (its graph is only kept on disk)")


class EvalConfig(_Section):
    knn_k: int = Field(20, ge=1, description="neighbours in the kNN monitor")
    knn_temperature: float = Field(0.07, gt=0, description="vote weight exp(similarity / T)")
    max_samples: int = Field(10000, ge=2, description=(
        "held-out samples evaluated at most (a fixed seeded subset); the rest are never read"))
    max_train_samples: int = Field(20000, ge=2, description=(
        "training samples (a fixed seeded subset) the kNN monitor and the linear probe compare against, and "
        "the batch statistics are computed on"))
    batch_size: int = Field(512, ge=1, description="samples per forward pass and per similarity chunk in evaluation")


class TrackingConfig(_Section):
    uri: Optional[str] = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db")
    experiment: str = Field("hardbatch", min_length=1, description="MLflow experiment name")
    run_name: Optional[str] = Field(None, description="MLflow run name (default: generated)")

    @field_validator("uri")
    @classmethod
    def _a_uri(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            check_tracking_uri(value)
        return value

    @field_validator("run_name")
    @classmethod
    def _a_plain_name(cls, value: Optional[str]) -> Optional[str]:
        # it names the run's directory under storage.path, so it must stay inside it
        if value is not None and (not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0")):
            raise ValueError("must be a plain name: not empty, no '/' or '\\', not '.' or '..' "
                             "(it names the run's directory under storage.path)")
        return value


def check_tracking_uri(uri: str) -> None:
    """Refuse what MLflow 3 cannot track to: plain paths and ``file:`` stores (its file store raises)."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if uri != "databricks" and (not scheme or scheme == "file"):
        raise ValueError("must be a tracking URI such as sqlite:///mlflow.db (a path after sqlite:/// is "
                         "relative to the working directory) or http://127.0.0.1:5000; MLflow 3 has no "
                         "plain-path or file: store")


class RayConfig(_Section):
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of a local Ray (default: this machine's)")
    object_store_mb: int = Field(512, ge=64, description="object store of a local Ray, MiB")


class StorageConfig(_Section):
    path: str = Field("hardbatch_results", description="checkpoints and graph versions (relative: to cwd)")


class CheckpointConfig(_Section):
    keep: Optional[int] = Field(
        3, ge=1, description="checkpoints kept, the newest (null: all); the best encoder is kept apart in best/")


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    sampler: SamplerConfig = SamplerConfig()
    refresh: RefreshConfig = RefreshConfig()
    augment: AugmentConfig = AugmentConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.train.batch_size % self.train.num_workers:
            raise ValueError(
                f"train.batch_size = {self.train.batch_size} must be a multiple of "
                f"train.num_workers = {self.train.num_workers} (each rank takes an equal slice)")
        kind, source = self.loss.kind, self.data.source
        if kind == "bimodal" and source not in sources.PAIRED:
            raise ValueError(
                f"loss.name = {self.loss.name!r} trains two towers on paired data: data.source must be one "
                f"of {', '.join(sorted(sources.PAIRED))}, got {source!r}")
        if kind != "bimodal" and source in sources.PAIRED:
            raise ValueError(
                f"data.source = {source!r} is paired data for two towers: loss.name must be one of "
                f"{', '.join(sorted(BIMODAL_LOSSES))}, got {self.loss.name!r}")
        user_data = sources.source_class(source).user_data  # labels known once probed (validate)
        if kind == "classifier" and source not in sources.LABELLED and not user_data:
            raise ValueError(
                f"loss.name = 'soft_infonce' trains a classifier: data.source must have labels "
                f"({', '.join(sorted(sources.LABELLED - sources.PAIRED))}), got {source!r}")
        noise = self.loss.section("soft_infonce").get("noise")
        classes = sources.NUM_CLASSES.get(source)
        if kind == "classifier" and noise is not None and classes is not None and len(noise) != classes:
            raise ValueError(
                f"loss.soft_infonce.noise has {len(noise)} entries: data.source = {source!r} has {classes} "
                f"classes, so it needs one probability per class")
        if self.train.precision == "fp16" and not self.train.use_gpu:
            raise ValueError("train.precision = 'fp16' needs train.use_gpu = true (fp16 autocast is a GPU mode; "
                             "on CPUs take 'bf16' or 'fp32')")
        if self.train.batch_size // self.train.num_workers < 2:
            raise ValueError(
                f"train.batch_size = {self.train.batch_size} gives fewer than 2 samples per worker "
                f"with train.num_workers = {self.train.num_workers}")
        return self

    def flat(self) -> dict[str, Any]:
        """Every leaf as ``{"section.key": value}``: the form logged as MLflow params."""
        return _flatten(self.model_dump())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# loading, overrides and errors


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config model, e.g. ``train.batch_size``."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(valid_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> (["a", "b"], value), the value parsed as a YAML scalar (so 3 is an int)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, for example --set train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides and validate.

    Raises:
        ConfigError: a missing or unreadable file, an unknown key, or a value that fails validation.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if file.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML file, e.g. configs/digits.yaml")
        if not file.is_file():
            raise ConfigError(f"config file not found: {str(path)!r}")
        try:
            loaded = yaml.load(file.read_text(encoding="utf-8"), Loader=_StrictLoader)
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}: "
                              f"{err.object[err.start:err.start + 1]!r})") from None
        except OSError as err:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        # an empty section (`train:` with nothing under it) means its defaults, as an empty file does
        raw = {key: value for key, value in loaded.items() if not (key in Config.model_fields and value is None)}
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for part in keys[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(keys[:-1])} is not a section")
            node = child
        node[keys[-1]] = value
    return validate(raw)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last one
    silently, which would drop the first section's settings)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice in one section (also on line {seen[key]}); keep one", mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what the YAML parser found and where (line and column, 1-based)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def validate(raw: dict[str, Any]) -> Config:
    """Validate a nested mapping into a frozen :class:`Config`, turning errors into one clear line."""
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, raw)) from None
    _check_dataset_bounds(config)
    probe_data(config)
    if config.tracking.uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
        try:
            check_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        except ValueError as err:
            raise ConfigError(f"$MLFLOW_TRACKING_URI = {os.environ['MLFLOW_TRACKING_URI']!r}: {err}") from None
    if os.environ.get("RAY_ADDRESS"):  # its resources are checked once connected (check_cluster)
        check_cluster_paths(config)
    else:
        check_resources(config, local_cpus(config))
        if config.train.use_gpu or config.refresh.num_gpus:
            check_gpus(config, local_gpus())
    return config


_CLUSTER_STORAGE_FIX = ("give an absolute path on storage that every node mounts at the same place "
                        "(cluster.yaml: /mnt/hardbatch/results)")
_CLUSTER_TRACKING_FIX = ("log to an MLflow server: tracking.uri or $MLFLOW_TRACKING_URI = http://<head>:5000 "
                         "(cluster.yaml starts one on the head and sets $MLFLOW_TRACKING_URI on every node)")


def _sqlite_path(uri: str) -> Optional[str]:
    """The file of a ``sqlite:///`` URI (absolute when the URI has four slashes), else ``None``."""
    return uri[len("sqlite:///"):] if uri.lower().startswith("sqlite:///") else None


def check_cluster_paths(config: Config) -> None:
    """On a cluster (``RAY_ADDRESS`` set), what needs no connection: no relative ``storage.path`` and a
    tracking URI that is given and, for sqlite, absolute.

    A job sent with ``ray job submit --working-dir`` runs in a copy of the working directory that Ray
    deletes with the job: a relative path (and the default tracking store, ``mlflow.db`` in the working
    directory) would put checkpoints, graph versions and the MLflow run there.
    """
    if not Path(config.storage.path).is_absolute():
        raise ConfigError(f"storage.path = {config.storage.path!r} is relative, and on a cluster (RAY_ADDRESS is set) "
                          f"it would resolve inside the job's copy of the working directory, deleted with the job: "
                          f"{_CLUSTER_STORAGE_FIX}")
    uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError("tracking.uri is not set (nor $MLFLOW_TRACKING_URI): on a cluster (RAY_ADDRESS is set) the "
                          "default, sqlite:///mlflow.db in the job's copy of the working directory, is deleted with "
                          f"the job; {_CLUSTER_TRACKING_FIX}")
    path = _sqlite_path(uri)
    if path is not None and not path.startswith("/"):
        raise ConfigError(f"tracking.uri = {uri!r} is a relative sqlite path, and on a cluster (RAY_ADDRESS is set) it "
                          f"would resolve inside the job's copy of the working directory, deleted with the job; "
                          f"{_CLUSTER_TRACKING_FIX}, or on a one-node cluster an absolute sqlite:////path/mlflow.db")


def check_cluster(config: Config, uri: str, nodes: int, can_add_nodes: bool, reachable: dict[str, float]) -> None:
    """What a connected cluster must offer the run, before it takes any of it.

    Args:
        uri: the resolved tracking URI.
        nodes: alive nodes now.
        can_add_nodes: whether the autoscaler may add nodes (a node type with room to grow).
        reachable: the resources the cluster has or can scale to (:func:`reachable_resources`).

    A sqlite store is a file on one node: rank 0 and the driver may run on different nodes and would
    write two different databases, so it is refused on a cluster of more than one node (now or after
    scaling). Resources count what the autoscaler can add, so a job can start on a cluster scaled to
    zero GPU nodes.
    """
    if _sqlite_path(uri) is not None and (nodes > 1 or can_add_nodes):
        shape = f"{nodes} nodes" if nodes > 1 else "a cluster whose autoscaler can add nodes"
        raise ConfigError(f"tracking.uri = {uri!r}: a sqlite file lives on one node, and on {shape} the driver and "
                          f"rank 0 may write different copies; {_CLUSTER_TRACKING_FIX}")
    check_resources(config, reachable.get("CPU", 0.0), where="the cluster can have", fix="")
    if config.train.use_gpu or config.refresh.num_gpus:
        check_gpus(config, reachable.get("GPU", 0.0), where="the cluster can have, its autoscaler included,",
                   fix="add a GPU node type to the cluster config, or turn them off")


def reachable_resources(current: dict[str, float], autoscaler_max: Optional[dict[str, float]]) -> dict[str, float]:
    """Per resource, the larger of what the cluster has now and what its autoscaler config allows
    (``None``: no autoscaler, e.g. ``ray start --head`` by hand)."""
    out = {k: float(v) for k, v in current.items()}
    for key, value in (autoscaler_max or {}).items():
        out[key] = max(out.get(key, 0.0), float(value))
    return out


def local_gpus() -> int:
    """GPUs a local Ray started by this job will see (CUDA devices visible to torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return 0
    import torch

    return torch.cuda.device_count()


def train_worker_gpus(config: Config) -> float:
    """GPUs each Train worker asks for: none without ``train.use_gpu``; else 1, less one embedding
    actor's share when ``refresh.num_gpus`` is a fraction, so that the actor runs on a training GPU
    (a worker holding a whole GPU would leave it nothing, and the refresh would wait forever)."""
    if not config.train.use_gpu:
        return 0.0
    share = config.refresh.num_gpus
    return 1.0 - share if 0 < share < 1 else 1.0


def gpu_demand(config: Config) -> float:
    """GPUs one run holds: :func:`train_worker_gpus` per Train worker, plus ``refresh.num_gpus``
    per embedding actor."""
    return config.train.num_workers * train_worker_gpus(config) + config.refresh.pool_size * config.refresh.num_gpus


def check_gpus(config: Config, gpus: float, where: str = "a local Ray will have",
               fix: str = "run on a GPU machine or a cluster via RAY_ADDRESS, or turn them off") -> None:
    """The run's GPU requests (:func:`gpu_demand`) must fit in ``gpus``, or Ray would wait for
    them forever."""
    wanted = gpu_demand(config)
    if wanted > gpus:
        asked = ([f"train.use_gpu = true ({config.train.num_workers} workers x {train_worker_gpus(config):g})"]
                 if config.train.use_gpu else [])
        if config.refresh.num_gpus:
            asked.append(f"refresh.num_gpus = {config.refresh.num_gpus:g} x {config.refresh.pool_size} actors")
        raise ConfigError(f"{' and '.join(asked)}: {wanted:g} GPUs wanted, {where} {gpus:g} ({fix})")


def local_cpus(config: Config) -> int:
    """CPUs a local Ray started by this job will have."""
    return config.ray.num_cpus or os.cpu_count() or 1


def check_resources(config: Config, cpus: float, where: str = "Ray will have",
                    fix: str = "set ray.num_cpus, or ") -> None:
    """Train workers plus the embedding pool must fit in ``cpus`` logical CPUs (no deadlock)."""
    workers = config.train.num_workers
    if workers > cpus:
        raise ConfigError(
            f"train.num_workers = {workers} exceeds the {cpus:g} CPUs {where} "
            f"({fix}use at most {int(cpus)} workers)")
    reserved = config.refresh.pool_size * config.refresh.num_cpus
    per_worker = config.train.cpus_per_worker
    if per_worker is not None and workers * per_worker + reserved > cpus:
        raise ConfigError(
            f"train.cpus_per_worker = {per_worker:g} x {workers} workers plus the embedding pool "
            f"({reserved:g} CPUs) exceeds the {cpus:g} CPUs {where}")
    if per_worker is None and (cpus - reserved) / workers <= 0:
        raise ConfigError(
            f"refresh.pool_size x refresh.num_cpus = {reserved:g} leaves no CPU for "
            f"{workers} train workers out of {cpus:g}")


def cpus_per_worker(config: Config, cpus: float) -> float:
    """Logical CPUs each train worker asks for: the configured value, else the share left after
    reserving the embedding pool, at most 1."""
    if config.train.cpus_per_worker is not None:
        return config.train.cpus_per_worker
    reserved = config.refresh.pool_size * config.refresh.num_cpus
    return round(min(1.0, (cpus - reserved) / config.train.num_workers), 4)


def probe_data(config: Config) -> None:
    """Look at the user's data (seconds at most, short storage timeouts) and check it against the loss:
    the paths exist and hold images or the named columns, and ``soft_infonce`` gets labels.

    Raises:
        ConfigError: one line naming the path and what is wrong.
    """
    made = config.data.make_sources()
    if not made[0].user_data:
        return
    try:
        probes = [source.probe() for source in made]
    except sources.SourceError as err:
        raise ConfigError(str(err)) from None
    if config.loss.kind == "classifier" and not probes[0].labelled:
        raise ConfigError(f"loss.name = 'soft_infonce' trains a classifier: data.source = {config.data.source!r} has no "
                          f"labels (give class sub-folders, or data.label_column for parquet)")
    noise = config.loss.section("soft_infonce").get("noise")
    classes = probes[0].num_classes
    if config.loss.kind == "classifier" and noise is not None and classes is not None and len(noise) != classes:
        raise ConfigError(f"loss.soft_infonce.noise has {len(noise)} entries: data.source = {config.data.source!r} has "
                          f"{classes} classes, so it needs one probability per class")


# Keys a resumed run may change: where and how it runs, not what it trains (check_resume).
RUNTIME_KEYS = ("ray.", "tracking.", "storage.", "checkpoint.", "train.max_failures", "train.cpus_per_worker",
                "train.log_every_steps", "train.use_gpu", "train.channels_last", "train.compile", "data.store",
                "data.s3_endpoint", "data.feed_workers", "data.feed_prefetch", "sampler.prefetch", "refresh.pool_size",
                "refresh.num_cpus", "refresh.num_gpus", "refresh.batch_size", "refresh.final_wait_s", "eval.batch_size")


def check_resume(saved: dict[str, Any], config: Config) -> None:
    """A resumed run must train what it started training: ``config`` may differ from the ``saved`` flat
    config of its first attempt only in :data:`RUNTIME_KEYS`; else the differing keys are named."""
    now = {k: v for k, v in config.flat().items()}
    keys = sorted(set(saved) | set(now))
    changed = [k for k in keys if not k.startswith(RUNTIME_KEYS) and _jsonable(saved.get(k)) != _jsonable(now.get(k))]
    if any(k not in saved for k in changed):  # a key added since the run started: unchanged at its default
        defaults = Config.model_validate({}).flat()
        changed = [k for k in changed if k in saved or _jsonable(now.get(k)) != _jsonable(defaults.get(k))]
    if changed:
        shown = ", ".join(f"{k} = {now.get(k)!r} (was {saved.get(k)!r})" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ConfigError(f"tracking.run_name = {config.tracking.run_name!r} resumes a run started with another "
                          f"config: {shown}{more}; resume with the original values, or choose another run name "
                          f"(only where and how it runs may change: {', '.join(k.rstrip('.') for k in RUNTIME_KEYS[:4])}, ...)")


def _jsonable(value: Any) -> Any:
    """A config value as it reads back from JSON (tuples are lists)."""
    import json

    return json.loads(json.dumps(value, default=str))


def check_model(config: Config, x_shape: tuple[int, ...]) -> None:
    """The backbone takes the data's samples of ``x_shape`` (known once the data is listed, before Ray)."""
    from trainers.models import resolve_model

    try:
        resolve_model(config.model.model_dump(), tuple(x_shape))
    except ValueError as err:
        raise ConfigError(f"{err} (data.source = {config.data.source!r} gives samples of shape "
                          f"{tuple(x_shape)})") from None


def check_dataset_size(config: Config, train_size: int) -> None:
    """The batch and the graph's out-degree must fit the training split (once its size is known)."""
    _check_dataset_bounds(config, train_size)


def _check_dataset_bounds(config: Config, size: Optional[int] = None) -> None:
    if size is None:
        size = sources.train_size(config.data.source, config.data.test_fraction, config.data.num_samples)
    if size is None:
        return
    if config.sampler.k >= size:
        raise ConfigError(
            f"sampler.k = {config.sampler.k} must be smaller than the training split of "
            f"{config.data.source} ({size} samples)")
    if config.train.batch_size > size:
        raise ConfigError(
            f"train.batch_size = {config.train.batch_size} exceeds the training split of "
            f"{config.data.source} ({size} samples)")


def _describe(err: ValidationError, raw: dict[str, Any]) -> str:
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown config key {loc!r}; {_key_hint([str(part) for part in first['loc']])}"
    if kind == "model_type" and len(first["loc"]) == 1:  # `train: 3` instead of a section
        keys = [k for k in valid_keys() if k.startswith(f"{loc}.")]
        return f"{loc} = {first.get('input')!r}: must be a section (a mapping) of {', '.join(keys)}"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if kind == "literal_error":
        message = "must be one of " + message.removeprefix("Input should be ")
    message = _must(message)
    if not loc or isinstance(first.get("input"), dict):  # cross-field checks name their fields
        return message
    value = first.get("input", _lookup(raw, first["loc"]))
    return f"{loc} = {value!r}: {message}"


def _must(message: str) -> str:
    """pydantic's "Input should be less than 1" as "must be less than 1"."""
    return "must be " + message[len("Input should be "):] if message.startswith("Input should be ") else message


def _closest(word: str, options: list[str]) -> Optional[str]:
    """The option a typo most likely meant: one it starts (``ema`` -> ``ema_base``), else the
    closest by difflib, else ``None``."""
    prefixed = [option for option in options if option.startswith(word)] if len(word) >= 3 else []
    if len(prefixed) == 1:
        return prefixed[0]
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return close[0] if close else None


def _key_hint(parts: list[str]) -> str:
    """A hint for an unknown key: the section first (``trian.epochs`` -> ``train.epochs``), then
    the key within it; failing both, the section's own keys (or the sections)."""
    sections = list(Config.model_fields)
    section, rest = parts[0], parts[1:]
    if section not in sections:
        close = _closest(section, sections)
        if close is None:
            return f"sections: {', '.join(sections)}"
        guess = ".".join([close, *rest])
        return f"did you mean {guess!r}?" if guess in valid_keys() else f"did you mean section {close!r}?"
    own = [k.split(".", 1)[1] for k in valid_keys() if k.startswith(f"{section}.")]
    close = _closest(".".join(rest), own)
    return f"did you mean '{section}.{close}'?" if close else f"{section} keys: {', '.join(own)}"


def _lookup(raw: Any, loc: tuple) -> Any:
    for part in loc:
        if not isinstance(raw, dict) or part not in raw:
            return None
        raw = raw[part]
    return raw


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def reference_table() -> str:
    """The configuration reference as a markdown table (README "Configuration" is generated from it)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
            else:
                default = field.get_default(call_default_factory=True)
                rows.append(f"| `{prefix}{name}` | `{default}` | {field.description or ''} |")

    walk(Config, "")
    return "\n".join(rows)


def _arg_descriptions(cls: type) -> dict[str, str]:
    """``name -> text`` from the ``Args:`` section of a class docstring (continuation lines joined)."""
    import inspect
    import re

    doc = inspect.getdoc(cls) or ""
    if "Args:" not in doc:
        return {}
    out: dict[str, str] = {}
    current = None
    for line in doc.split("Args:", 1)[1].splitlines():
        if line and not line.startswith(" "):
            break  # the next section
        match = re.match(r"^ {4}(\w+): (.*)$", line)
        if match:
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    from trainers.losses import MIXINGS, TILTS

    constants = {"`TILTS`": ", ".join(f"`{t}`" for t in TILTS), "`MIXINGS`": ", ".join(f"`{m}`" for m in MIXINGS)}
    cleaned = {}
    for key, text in out.items():
        text = re.sub(r":\w+:`([^`]+)`", r"\1", text).replace("``", "`").replace("|", "\\|")
        for name, values in constants.items():
            text = text.replace(name, values)
        cleaned[key] = text
    return cleaned


def loss_reference_table() -> str:
    """Every loss's settings (``loss.<name>.<key>``) with defaults, as a markdown table (README "Losses")."""
    from trainers.losses import LOSSES

    kinds = {"siamese": "two views, shared encoder", "ema": "two views + EMA target network",
             "classifier": "encoder + linear head on labels", "bimodal": "two towers on paired data"}
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name in LOSS_NAMES:
        cls = LOSSES[name]
        kind = LossConfig(name=name).kind
        rows.append(f"| **`loss.name: {name}`** | | {kinds[kind]} (`{cls.__name__}`) |")
        described = _arg_descriptions(cls)
        for key, default in cls.params().items():
            rows.append(f"| `loss.{name}.{key}` | `{default}` | {described.get(key, '')} |")
        options = TRAINING_OPTIONS.get(name)
        for key, field in (options.model_fields.items() if options else ()):
            rows.append(f"| `loss.{name}.{key}` | `{field.default}` | {field.description} (training) |")
    return "\n".join(rows)
