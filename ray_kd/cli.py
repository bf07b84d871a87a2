"""`ray-kd`: a thin command line over the Python API (`ray_kd.api`). Errors: one line, exit 2."""

from __future__ import annotations

import argparse
import atexit
import os
import shlex
import sys

from ray_kd.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-kd", description="Distributed online knowledge distillation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="YAML run spec (see configs/); defaults run DML on the digits")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override any field, e.g. optim.epochs=5 students.0.model=resnet8")

    def restart_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--restart", action="store_true",
                       help="discard the checkpoints of the run with this name and start it over")

    train = sub.add_parser("train", help="run (or resume) one distillation run")
    run_args(train)
    restart_arg(train)
    teacher = sub.add_parser("train-teacher", help="run the config (its method: e.g. configs/digits_teacher.yaml, "
                                                   "one model with cross-entropy) and save its best student as a "
                                                   "teacher file")
    run_args(teacher)
    restart_arg(teacher)
    teacher.add_argument("--out", required=True, help="where to write the teacher checkpoint (.pt)")
    teacher.add_argument("--keep", choices=["best", "last"], default="best",
                         help="save the weights of the best validation epoch (default) or of the last epoch")
    cache = sub.add_parser("cache-teacher", help="compute a frozen teacher's outputs for every step of the run "
                                                 "into teacher.cache, for the runs, seeds and sweeps that share them")
    run_args(cache)
    tune = sub.add_parser("tune", help="search hyper-parameters with Ray Tune (each trial a full distillation run)")
    run_args(tune)
    tune.add_argument("--space", "-s", required=True, help="YAML search space (see tuning/spaces/)")
    tune.add_argument("--restart", action="store_true",
                      help="discard the sweep with this name (its trials, results and Tune state) and start it over")
    report = sub.add_parser("report", help="mean ± std over seeds per method, and the paired gain over the "
                                           "student alone, from the finished runs of an experiment")
    report.add_argument("--experiment", "-e", default="ray-kd", help="MLflow experiment (default: ray-kd)")
    report.add_argument("--out", default="runs/report", help="folder for report.md/.csv/.png (default: runs/report)")
    report.add_argument("--tracking-uri", help="MLflow store; MLFLOW_TRACKING_URI wins, else sqlite:///mlflow.db")
    export = sub.add_parser("export", help="write a run's student (raw images in) as ONNX, TorchScript or pt2, "
                                           "checked against PyTorch on the run's test split")
    export.add_argument("source", help="a run folder, or the best student file in it")
    export.add_argument("--format", "-f", choices=["onnx", "torchscript", "pt2"], default="onnx")
    export.add_argument("--out", "-o", help="the file to write (default: beside the checkpoint)")
    sub.add_parser("models", help="list the registered models")
    sub.add_parser("methods", help="list the distillation methods")
    sub.add_parser("datasets", help="list the data sources (data.dataset)")
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command's arguments; key=value overrides may stand before and after its options (`tune a=1 --space s.yaml
    b=2`), which argparse alone takes as one list only, and refuses the rest of as unrecognized."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from ray_kd.stopping import RunStopped, install_handlers, signal_of

    install_handlers()
    try:
        return _dispatch(args)
    except KeyboardInterrupt as err:  # before a run started (imports, preflight, cluster start-up)
        print("ray-kd: stopped before training started", file=sys.stderr)
        return 128 + signal_of(err)
    except UserError as err:
        print(f"ray-kd: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        given = sys.argv[1:] if argv is None else argv
        command = shlex.join(["ray-kd", *(a for a in given if a != "--restart")])  # a resume keeps what was done
        print(f"ray-kd: {stop}; resume with: {command}", file=sys.stderr)
        return stop.exit_code


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "models":
        from ray_kd.models import list_models, model_origin

        for name in list_models():
            print(f"{name:16s} {model_origin(name)}")
        return 0
    if args.command == "methods":
        from ray_kd.methods import list_methods

        for name, origin, summary in list_methods():
            print(f"{name:12s} {origin:24s} {summary}")
        return 0
    if args.command == "datasets":
        from ray_kd.data_sources import list_datasets

        for name, origin, summary in list_datasets():
            print(f"{name:12s} {origin:24s} {summary}")
        return 0
    if args.command == "report":
        from ray_kd.reporting import report

        report(args.experiment, args.out, args.tracking_uri)
        return 0
    if args.command == "export":
        from ray_kd.export import export

        export(args.source, args.format, args.out)
        return 0
    from ray_kd import api

    if args.command == "train":
        api.train(args.config, args.overrides, restart=args.restart)
    elif args.command == "tune":
        api.tune(args.config, args.space, args.overrides, restart=args.restart)
    elif args.command == "cache-teacher":
        api.cache_teacher(args.config, args.overrides)
    elif args.command == "train-teacher":
        api.train_teacher(args.config, args.out, args.overrides, restart=args.restart, keep=args.keep)
    return 0


def run(argv: list[str] | None = None) -> None:
    """The `ray-kd` command: `main`, then exit without the interpreter's teardown of torch, Ray and MLflow
    modules (3 s on a 2-core machine), once everything a run writes is written: the atexit handlers (Ray's
    shutdown of a cluster this process started, MLflow's flushes) run first, and the output is flushed."""
    code = main(argv)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
