"""Combine training runs with weights (and per-class biases) chosen on their out-of-fold
predictions, predict a test split and print the submission CSV.

    python ensemble.py sequence apex --split test_B > submission.csv
"""

import argparse

from mer.cli import add_submission_args, config_from_args, run_main, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run names (runs/NAME) or run folders")
    add_submission_args(parser)
    args = parser.parse_args()

    def go() -> None:
        from mer.ensembling import run_ensemble

        setup_logging(args.verbose)
        run_ensemble(config_from_args(args), args.runs, args.split, args.device, truth=args.truth,
                     archive_files=not args.no_archive, cache=args.cache, root=args.root)

    run_main(go)


if __name__ == "__main__":
    main()
