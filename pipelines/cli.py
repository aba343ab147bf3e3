"""hardbatch: contrastive training on Ray with batches drawn from a proximity graph.

    hardbatch run CONFIG [--set key=value ...] [-v]  train, log to MLflow (-v: Ray's own lines too)
    hardbatch validate CONFIG [--set key=value ...]  check a config without starting Ray
    hardbatch sweep CONFIG --grid key=v1,v2 [--grid ...] [--seeds N] [--set key=value ...]
                                                     every combination, as child runs of one MLflow run
    hardbatch compare --experiment NAME [--metric eval/knn_acc] [--out DIR] [--baseline VARIANT]
                                                     table, CSV and plots of an experiment's runs
    hardbatch export --run RUN_ID --out DIR [--which final|best] [--format export|torchscript]
                                                     a run's trained encoder as one file + encoder.json
    hardbatch embed --run RUN_ID --source SOURCE --out DIR [--which final|best] [--batch-size N]
                                                     embeddings of any source as a parquet dataset
    hardbatch generate shapes|gratings DIR [--train N] [--test N] [--classes C] [--size S] [--seed K]
                                                     a seeded image-folder data set (DIR/train, DIR/test)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from pipelines.config import ConfigError, load_config


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hardbatch")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


def _add_config_args(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("config", help="YAML config file, e.g. configs/digits.yaml")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key, e.g. --set train.epochs=3 (repeatable)")
    cmd.add_argument("-v", "--verbose", action="store_true",
                     help="show Ray's and MLflow's own INFO lines too (default: hardbatch's progress, "
                          "warnings and errors only)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hardbatch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run a training job"), ("validate", "check a config, start nothing")):
        _add_config_args(sub.add_parser(name, help=help_text))

    sweep = sub.add_parser("sweep", help="run every combination of a grid of config values")
    _add_config_args(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="values of one config key to sweep, e.g. --grid sampler.name=uniform,rwr "
                            "(repeatable: the sweep is the cartesian product)")
    sweep.add_argument("--seeds", type=int, default=1, metavar="N",
                       help="runs per variant, with train.seed + 0 .. N-1 (default 1)")
    sweep.add_argument("--name", default=None, help="the sweep's MLflow parent run name (default sweep-<time>)")
    sweep.add_argument("--max-parallel", type=int, default=None, metavar="N",
                       help="runs at once (default: 1 on a local Ray; on a cluster, as many as its "
                            "resources hold; more than 1 needs an MLflow server as the store)")

    compare = sub.add_parser("compare", help="compare the runs of an MLflow experiment")
    compare.add_argument("--experiment", required=True, help="MLflow experiment name")
    compare.add_argument("--metric", default="eval/knn_acc", help="metric to compare (default eval/knn_acc)")
    compare.add_argument("--mode", choices=("max", "min"), default="max",
                         help="whether higher (max, default) or lower values of the metric are better")
    compare.add_argument("--out", default=None, metavar="DIR",
                         help="report directory (default hardbatch_results/compare/<experiment>)")
    compare.add_argument("--sweep", default=None, metavar="RUN_ID",
                         help="compare the children of this sweep (default: the latest sweep)")
    compare.add_argument("--all", action="store_true", help="compare every finished run of the experiment")
    compare.add_argument("--tracking-uri", default=None,
                         help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    compare.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    compare.add_argument("--baseline", default=None, metavar="VARIANT",
                         help="set every variant against this one, paired by seed: mean difference, 95 %% interval, "
                              "paired t-test (e.g. --baseline sampler.name=uniform)")

    for name, help_text in (("export", "write a run's trained encoder as a TorchScript or torch.export file"),
                            ("embed", "embed a source with a run's trained encoder, into a parquet dataset")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--run", required=True, metavar="RUN_ID", help="the MLflow run id `hardbatch run` printed")
        cmd.add_argument("--which", choices=("final", "best"), default="final",
                         help="the last epoch's encoder (final, default) or the best epoch's (best)")
        cmd.add_argument("--tracking-uri", default=None,
                         help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
        if name == "export":
            cmd.add_argument("--out", required=True, metavar="DIR",
                             help="folder for encoder.pt2 (or encoder.pt) and encoder.json")
            cmd.add_argument("--format", choices=("export", "torchscript"), default="export",
                             help="export (torch.export, default) or torchscript (scripted)")
        else:
            cmd.add_argument("--source", required=True,
                             help="any data source hardbatch reads: images:PATH, parquet:PATH, builtin:digits, ...")
            cmd.add_argument("--out", required=True, metavar="DIR", help="new (or empty) folder for the parquet files")
            cmd.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (default 256)")
            cmd.add_argument("--image-column", default=None,
                             help="parquet sources: the image column (default: the run's data.image_column)")
            cmd.add_argument("--label-column", default=None,
                             help="parquet sources: the label column (default: the run's data.label_column)")
        cmd.add_argument("-v", "--verbose", action="store_true", help="show Ray's and MLflow's own INFO lines too")

    generate = sub.add_parser("generate", help="write a seeded image-folder data set (train and test class folders)")
    generate.add_argument("kind", choices=("shapes", "gratings"),
                          help="shapes: the benchmark where raw pixels are near chance (pipelines/shapes.py); "
                               "gratings: oriented gratings (pipelines/synthetic.py)")
    generate.add_argument("out", metavar="DIR", help="new (or empty) folder: DIR/train/class_NN/*.png, DIR/test/...")
    generate.add_argument("--train", type=int, default=1200, metavar="N", help="training images per class (default 1200)")
    generate.add_argument("--test", type=int, default=200, metavar="N", help="test images per class (default 200)")
    generate.add_argument("--classes", type=int, default=10, metavar="C", help="classes (default 10)")
    generate.add_argument("--size", type=int, default=32, metavar="S", help="image side in pixels (default 32)")
    generate.add_argument("--seed", type=int, default=0, metavar="K", help="seed of everything drawn (default 0)")
    return parser


def _generate(args: argparse.Namespace) -> int:
    """``hardbatch generate``: the bad request in one line (exit 2), else the folder and how to use it."""
    import time
    from pathlib import Path

    from pipelines.synthetic import image_folder

    out = Path(args.out)
    for name, least in (("train", 1), ("test", 0), ("classes", 1), ("size", 8)):
        if getattr(args, name) < least:
            print(f"hardbatch: --{name} {getattr(args, name)}: must be at least {least}", file=sys.stderr)
            return 2
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"hardbatch: {out}: exists and is not an empty folder; give a new one", file=sys.stderr)
        return 2
    splits = {"train": args.train, **({"test": args.test} if args.test else {})}
    t0 = time.perf_counter()
    try:
        made = image_folder(out, num_classes=args.classes, per_class=splits, size=args.size, seed=args.seed,
                            kind=args.kind)
    except ValueError as err:
        print(f"hardbatch: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{len(files)} {split}" for split, files in made.files.items())
    print(f"[hardbatch] {args.kind}: {counts} images of {args.size}x{args.size}, {args.classes} classes, "
          f"seed {args.seed}, in {out} ({time.perf_counter() - t0:.1f} s)")
    test = f" --set data.test_source=images:{out / 'test'}" if args.test else ""
    print(f"[hardbatch] train on it: hardbatch run CONFIG --set data.source=images:{out / 'train'}{test}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if not os.environ.get("RAY_ADDRESS"):
        # A local Ray with token authentication, as a choice rather than Ray's default (which warns
        # on every start). Set before Ray is imported: Ray reads it once, at import.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if getattr(args, "verbose", False):
        from trainers.progress import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"  # read by this process and the local Ray's workers
    if args.command == "compare":
        from pipelines.compare import main_compare

        return main_compare(args)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "generate":
        return _generate(args)
    if args.command in ("export", "embed"):
        try:
            from pipelines import export

            return export.main_export(args) if args.command == "export" else export.main_embed(args)
        except KeyboardInterrupt:
            print(f"[hardbatch] stopped: {args.out} may hold part of the output", flush=True)
            return 130
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"hardbatch: config error: {err}", file=sys.stderr)
        return 2
    if args.command == "validate":
        from trainers.tracking import resolve_tracking_uri

        # what a run will use: the selected loss with its defaults, the store's resolved URI
        selected = f"loss.{config.loss.name}."
        print(f"{args.config}: valid")
        for key, value in config.flat().items():
            if key.startswith(selected):
                continue
            print(f"  {key} = {resolve_tracking_uri(value) if key == 'tracking.uri' else value}")
            if key == "loss.name":
                for name, setting in config.loss.settings().items():
                    print(f"  {selected}{name} = {setting}")
        for source in config.data.make_sources():  # what the data looks like (a cheap probe, no listing)
            probe = source.probe()
            kind = f"labelled, {probe.num_classes} classes" if probe.num_classes else (
                "labelled" if probe.labelled else "unlabelled: kNN and the linear probe will be skipped")
            print(f"data: {source.spec}: found, {kind}")
        return 0
    from pipelines.run import RunFailed, run, stop_on_sigterm

    stop_on_sigterm()  # SIGTERM stops the run as Ctrl-C does (set again once Ray has started)
    try:
        run(config, config_path=args.config)
    except ConfigError as err:  # e.g. a cluster smaller than the config asks for
        print(f"hardbatch: config error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:  # training failed for good: why, what is intact, how to resume
        print(f"hardbatch: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(STOPPED, flush=True)
        return 130
    return 0


# What an interrupted run or sweep prints: the checkpoints stay, and re-running resumes.
STOPPED = ("[hardbatch] stopped: the MLflow run is marked KILLED; the same command (same tracking.run_name) "
           "resumes it from its last checkpoint")


def _sweep(args: argparse.Namespace) -> int:
    from pipelines.run import stop_on_sigterm
    from pipelines.sweep import plan_sweep, run_sweep

    stop_on_sigterm()
    try:
        plan = plan_sweep(args.config, args.grid, seeds=args.seeds, overrides=args.overrides, name=args.name)
        result = run_sweep(plan, max_parallel=args.max_parallel)
    except ConfigError as err:
        print(f"hardbatch: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[hardbatch] stopped: the sweep and its running child run are marked KILLED in MLflow; "
              "the child's checkpoints stay", flush=True)
        return 130
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
