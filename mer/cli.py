"""Shared command-line plumbing for the scripts: config options, logging to stderr, devices."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from .config import ConfigError, load_config
from .devices import parse_device
from .errors import UserError

log = logging.getLogger("mer")


def cpu_count() -> int:
    """Cores this process may use (respects CPU affinity, e.g. a cluster job's allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file overriding mer/defaults.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.epochs=30 (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def device_arg(text: str) -> str:
    """argparse type for --device: a checked device string, or a usage error (exit 2) at once."""
    try:
        return parse_device(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_device_arg(parser: argparse.ArgumentParser, what: str = "models run") -> None:
    parser.add_argument("--device", default="auto", type=device_arg,
                        help=f"where {what}: auto (CUDA when visible) | cpu | cuda | cuda:N")


def add_submission_args(parser: argparse.ArgumentParser) -> None:
    """The options predict.py and ensemble.py share."""
    parser.add_argument("--split", required=True, help="test_A | test_B (or any cached split)")
    parser.add_argument("--truth", help="truth table (Filename, EmotionId or Emotion) to score the submission")
    parser.add_argument("--no-archive", action="store_true", help="print the CSV only")
    parser.add_argument("--cache", help="cache holding the split, if not the run's own (e.g. a test set "
                        "preprocessed from its own folder with the same settings)")
    parser.add_argument("--root", help="dataset whose split table the submission must follow, re-read and checked "
                        "now (default: the table the cache was made from)")
    add_device_arg(parser)
    add_config_args(parser)


def config_from_args(args: argparse.Namespace) -> dict:
    return load_config(args.config, args.overrides)


def setup_logging(verbose: bool = False) -> None:
    """Logs go to stderr so that stdout carries only data (e.g. the submission CSV)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname).1s %(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main(): user-fixable errors become one clear line on stderr and exit code 2."""
    try:
        code = main()
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
