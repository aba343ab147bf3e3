"""The ``hardbatch`` command line.

    hardbatch run CONFIG [--set key=value ...]       train, log to MLflow
    hardbatch validate CONFIG [--set key=value ...]  check a config without starting Ray
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from pipelines.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hardbatch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run a training job"), ("validate", "check a config, start nothing")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("config", help="YAML config file, e.g. configs/digits.yaml")
        cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override one config key, e.g. --set train.epochs=3 (repeatable)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"hardbatch: config error: {err}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.config}: valid")
        for key, value in config.flat().items():
            print(f"  {key} = {value}")
        return 0
    from pipelines.run import run

    try:
        run(config, config_path=args.config)
    except ConfigError as err:  # e.g. a cluster smaller than the config asks for
        print(f"hardbatch: config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
