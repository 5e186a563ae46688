"""Train seeded models on subject-independent folds from the preprocessed cache.

    python train.py --fold all                       # every fold x seed, then the report
    python train.py --fold 2 --seeds 0               # one job of a cluster array
    python train.py --model apex_cnn --name apex     # the onset-apex baseline on the same folds
    python train.py --explain SAMPLE --name RUN      # ROI x time attention heatmap of one clip
    python train.py --extra CASME2 --extra SAMM      # declared extra training data (training side only)
"""

import argparse

from mer.cli import add_config_args, add_device_arg, config_from_args, run_main, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", default="all", help="'all' or one fold number")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: train.seeds of the config)")
    parser.add_argument("--model", help="model name (shortcut for --set model.name=)")
    parser.add_argument("--name", help="run name: outputs go to runs/NAME (default: the model name)")
    parser.add_argument("--root", help="dataset whose cache to use (when several are cached)")
    parser.add_argument("--cache", help="cache folder to use (cache/<dataset>/<key>)")
    parser.add_argument("--extra", action="append", metavar="ROOT",
                        help="declared extra training data: a dataset root (preprocessed with the same settings) "
                        "or its cache folder; repeatable; added to the training side of every fold only "
                        "(shortcut for --set train.extra=[...]; classes mapped by train.extra_class_map)")
    add_device_arg(parser)
    parser.add_argument("--jobs", default="auto", help="models trained in parallel processes (auto: one per "
                        "CPU core on CPU; on a GPU as many as its free memory holds, see train.gpu_job_mb)")
    parser.add_argument("--pretrain", action="store_true", help="self-supervised masked ROI-motion pretraining "
                        "first, one encoder per fold on its training side (shortcut for --set pretrain.enabled=true)")
    parser.add_argument("--deterministic", choices=["auto", "true", "false"],
                        help="deterministic kernels (bit-identical reruns and resumes): auto = on for the CPU, off "
                             "on CUDA (faster); shortcut for --set train.deterministic=")
    parser.add_argument("--explain", metavar="SAMPLE", help="write the attention heatmap of one clip (train: its out-of-fold models; test: all models)")
    parser.add_argument("--out", help="where --explain writes its PNG")
    add_config_args(parser)
    args = parser.parse_args()

    def go() -> None:
        from mer.cache import find_cache
        from mer.training import run_training

        setup_logging(args.verbose)
        cfg = config_from_args(args)
        if args.model:
            cfg["model"]["name"] = args.model
        if args.extra:
            cfg["train"]["extra"] = list(args.extra)
        if args.pretrain:
            cfg["pretrain"]["enabled"] = True
        if args.deterministic:
            cfg["train"]["deterministic"] = {"auto": "auto", "true": True, "false": False}[args.deterministic]
        name = args.name or cfg["model"]["name"]
        device = args.device
        if args.explain:
            from mer.explain import explain

            explain(cfg, name, args.explain, args.out, device)
            return
        cdir = find_cache(cfg["preprocess"]["cache_dir"], args.root, args.cache, cfg)
        run_training(cdir, cfg, name, args.fold, args.seeds, device, args.jobs)

    run_main(go)


if __name__ == "__main__":
    main()
