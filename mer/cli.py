"""Shared command-line plumbing for the scripts: config options, logging to stderr, devices."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from .config import ConfigError, load_config

log = logging.getLogger("mer")


class UserError(Exception):
    """A problem the user can fix (bad input, missing files): reported as one line, exit code 2."""


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


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def add_submission_args(parser: argparse.ArgumentParser) -> None:
    """The options predict.py and ensemble.py share."""
    parser.add_argument("--split", required=True, help="test_A | test_B (or any cached split)")
    parser.add_argument("--truth", help="truth table (Filename, EmotionId or Emotion) to score the submission")
    parser.add_argument("--no-archive", action="store_true", help="print the CSV only")
    parser.add_argument("--cache", help="cache holding the split, if not the run's own (e.g. a test set "
                        "preprocessed from its own folder with the same settings)")
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


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but torch sees no CUDA device (install a CUDA build of torch, see README)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got '{name}'")
    return name


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
