"""Raw DFME frames -> cached local-motion tensors.

    python preprocess.py --root DFME                     # every split found under DFME
    python preprocess.py --root DFME --splits test_B --workers 4
    python preprocess.py --root DFME --landmarks fan --device cuda   # FAN on the GPU
    python preprocess.py --root DFME --inspect SAMPLE    # a PNG to check one clip by eye
"""

import argparse

from mer.cli import add_config_args, add_device_arg, config_from_args, cpu_count, run_main, setup_logging
from mer.preprocessing import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="dataset folder (DFME layout, CAS(ME)^3) or manifest CSV")
    parser.add_argument("--splits", nargs="+", help="splits to process (default: all found)")
    parser.add_argument("--workers", type=int, default=cpu_count(),
                        help=f"parallel processes (default: every usable core, here {cpu_count()})")
    parser.add_argument("--force", action="store_true", help="recompute clips already cached")
    parser.add_argument("--shard", metavar="I/N", help="process only every N-th clip starting at I (job arrays)")
    parser.add_argument("--landmarks", choices=["dlib", "fan"], help="shortcut for --set preprocess.landmarks=")
    parser.add_argument("--flow", choices=["dis", "farneback"], help="shortcut for --set preprocess.flow=")
    parser.add_argument("--inspect", metavar="SAMPLE", help="write a PNG of one clip instead of caching")
    parser.add_argument("--out", help="where --inspect writes its PNG (default inspect_SAMPLE.png)")
    add_device_arg(parser, "FAN landmarks run (dlib and the flow always run on the CPU)")
    add_config_args(parser)
    args = parser.parse_args()

    def go() -> None:
        setup_logging(args.verbose)
        cfg = config_from_args(args)
        for key in ("landmarks", "flow"):
            if getattr(args, key):
                cfg["preprocess"][key] = getattr(args, key)
        run(args.root, cfg, splits=args.splits, workers=max(1, args.workers), force=args.force, shard=args.shard,
            inspect=args.inspect, inspect_out=args.out, device=args.device)

    run_main(go)


if __name__ == "__main__":
    main()
