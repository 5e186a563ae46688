"""Predict a test split with every fold x seed model of a run; print the submission CSV.

    python predict.py --split test_B > submission.csv
    python predict.py --split test_A --name sequence --truth truth/test_A.csv   # local scoring

stdout carries only the CSV (Filename,EmotionId); logs go to stderr. The upload files
(prediction.txt, prediction.zip) are archived under submissions/<split>-<run>-<time>/.
"""

import argparse

from mer.cli import add_submission_args, config_from_args, run_main, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", nargs="+", help="run(s) to average (default: the only run, or the model name)")
    add_submission_args(parser)
    args = parser.parse_args()

    def go() -> None:
        from mer.ensembling import predict_and_submit

        setup_logging(args.verbose)
        cfg = config_from_args(args)
        predict_and_submit(cfg, args.name, args.split, args.device, truth=args.truth,
                           archive_files=not args.no_archive, cache=args.cache,
                           root=args.root)

    run_main(go)


if __name__ == "__main__":
    main()
