"""Distillation quality: the student alone, KD, DML and the seed methods, several seeds, on the digits and
on the CIFAR-10 copy. Teachers are trained once per dataset (ray_kd.run.train_teacher), on the same
training subset as the students (LW-KD's on its synthesized glyphs). Every method runs with its config's
defaults; the protocol (PROTOCOL below) was fixed before any run and nothing is chosen on test.
Runs use the single-process executor (equal to the Ray one: tests/test_executors.py) and are resumable:
a run whose summary.json exists is skipped, a half-done one resumes from its last epoch. On a PINNED dataset the
teachers are committed files and the table's committed runs count as done: a session on another machine adds
seeds to the same table instead of starting it again.
`<method>@tuned` rows run the method with the values its validation sweep chose (benchmarks/sweeps.py,
results/tuned_<dataset>.json), on the same seeds and protocol.

    MLFLOW_TRACKING_URI=sqlite:////tmp/ray-kd-bench/mlflow.db .venv/bin/python benchmarks/quality.py \
        --dataset digits|cifar10|cifar10_15 [--methods ce kd ...] [--seeds 0 1 2]

`cifar10_15` is the longer protocol (issue 17): 10,000 training images, 15 epochs with a cosine schedule, the
teacher kept at its last epoch, the last epoch's test top-1 as the headline, every method paired against the
student alone and against KD. The runs table lists every run with its equivalent `ray-kd` command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
from pathlib import Path

from common import RESULTS, RUNS, machine, markdown_table, save

METHODS = ["ce", "kd", "dml", "sokd", "kd+skd", "sokd+skd", "mtkd_ssr", "lwkd", "tfkd"]
SEED_METHODS = ["sokd", "kd+skd", "sokd+skd", "mtkd_ssr", "lwkd"]
CONFIGS = {  # method -> config, per dataset; the teacher configs under "teacher" and "lwkd_teacher"
    "digits": {"teacher": "configs/digits_teacher.yaml", "lwkd_teacher": "configs/lwkd_teacher_digits.yaml",
               "ce": "configs/digits_alone.yaml", "kd": "configs/digits_kd.yaml", "dml": "configs/digits_dml.yaml",
               "sokd": "configs/sokd_digits.yaml", "kd+skd": "configs/skd_kd_digits.yaml",
               "mtkd_ssr": "configs/mtkd_digits.yaml", "lwkd": "configs/lwkd_digits.yaml",
               "tfkd": "configs/tfkd_digits.yaml"},
    "cifar10": {"teacher": "configs/bench_cifar10_teacher.yaml", "lwkd_teacher": "configs/lwkd_teacher_cifar10.yaml",
                "ce": "configs/bench_cifar10_alone.yaml", "kd": "configs/bench_cifar10_kd.yaml",
                "dml": "configs/bench_cifar10_dml.yaml", "sokd": "configs/sokd_cifar10.yaml",
                "kd+skd": "configs/skd_kd_cifar10.yaml", "mtkd_ssr": "configs/mtkd_cifar10.yaml",
                "lwkd": "configs/lwkd_cifar10.yaml", "tfkd": "configs/tfkd_cifar10.yaml"},
}
CONFIGS["cifar10_15"] = {**CONFIGS["cifar10"], "sokd+skd": "configs/skd_sokd_cifar10.yaml"}
PROTOCOL = {  # overrides every run of a dataset gets (teachers included, LW-KD's synthetic one excepted)
    # digits_cnn_s reaches 98-99% on the full digits: 300 training images (stratified) leave room to differ
    "digits": ["data.train_subset=300"],  # batch 64, 30 epochs, lr 0.05 x0.1 at 20: the configs' schedule
    # 5,000 training images (stratified), 1,000 for validation, the full 10,000-image test set; 5 epochs keep
    # 8 methods x 3 seeds near 40 minutes on 2 cores (evaluating a resnet20 teacher on 11,000 images every
    # epoch costs as much as its epoch of training)
    "cifar10": ["data.train_subset=5000", "data.val_fraction=0.02", "data.batch_size=128",
                "optim.epochs=5", "optim.milestones=[4]", "optim.lr=0.05"],
    # Issue 17's protocol: 10,000 training images (stratified), a separate 1,000 for validation from the rest
    # of the training split, the full 10,000-image test set, 15 epochs of SGD 0.1 with a cosine schedule
    # (to 0 at the end of the last epoch), batch 128; the headline is the last epoch's test top-1.
    "cifar10_15": ["data.train_subset=10000", "data.val_fraction=0.02", "data.batch_size=128",
                   "optim.epochs=15", "optim.schedule=cosine", "optim.milestones=[]", "optim.lr=0.1"],
}
TEACHER_EPOCHS = {"digits": [], "cifar10": ["optim.epochs=12", "optim.milestones=[9]"],
                  "cifar10_15": ["optim.epochs=30"]}  # resnet20 to >= 70% test top-1 on the 10,000 images
# Issue 17's controlled runs: each changes one thing from its method's row (paired against ce and kd on the
# same seeds). `teacher` names the teacher kind ('teacher15': the protocol's teacher trained 15 epochs instead of 30,
# the issue's ~68% one), `best` takes that run's best-validation epoch instead of its last.
# SKD's anti-collapse term off: its default was 0 until the validation evidence of both datasets (the
# `kd+skd@simplifier_ce` rows of quality_digits and quality_cifar10_15_v1) made it 0.6.
NO_SIMPLIFIER_CE = {"overrides": ["method.simplifier_ce_weight=0"],
                    "note": "SKD's simplifier_ce_weight 0 (its default before issue 17) instead of 0.6"}
# Issue 34: kd+skd@tuned with its simplifier removed (KD at the temperature and KD weight kd+skd's sweep chose):
# what the simplifier itself adds at the tuned values.
_TUNED_15 = RESULTS / "tuned_cifar10_15.json"
_CHOSEN_15 = json.loads(_TUNED_15.read_text()) if _TUNED_15.is_file() else {}
SKD_TUNED_KD = {k: v for k, v in _CHOSEN_15.get("kd+skd", {}).items() if not k.startswith("method.simplifier")}
# ... and with tuned KD's CE weight (kd+skd's space leaves it at its config's 0.1): whether that is the gap
SKD_TUNED_CE = {**_CHOSEN_15.get("kd+skd", {}), "method.ce_weight": _CHOSEN_15.get("kd", {}).get("method.ce_weight")}
CONTROLS = {"cifar10_15": {
    "kd@teacher15": {"teacher": "teacher15", "note": "a teacher trained 15 epochs instead of 30, kept at its last epoch"},
    "kd@teacher15_best": {"teacher": "teacher15", "best": True, "note": "that run's best-validation epoch instead"},
    "kd@even_weights": {"overrides": ["method.ce_weight=0.5", "method.kd_weight=0.5"],
                        "note": "CE 0.5 / KD 0.5 instead of 0.1 / 0.9"},
    "kd+skd@no_simplifier_ce": NO_SIMPLIFIER_CE,
    # issue 33: the KD loss on the teacher's top-k logits only (teacher.cache_topk), renormalised
    **{f"kd@top{k}": {"overrides": [f"teacher.cache={RUNS / 'teacher_cache'}", f"teacher.cache_topk={k}"],
                      "note": f"the teacher's top-{k} logits only (teacher.cache_topk={k}, fp16) instead of all 10"}
       for k in (3, 5)},
    **({"kd@skd_tuned": {"overrides": [f"{k}={v}" for k, v in SKD_TUNED_KD.items()],
                         "note": "KD at kd+skd@tuned's temperature and KD weight, without the simplifier "
                                 f"({' '.join(f'{k.split(chr(46))[-1]}={v:.3g}' for k, v in SKD_TUNED_KD.items())})"}}
       if SKD_TUNED_KD else {}),
    **({"kd+skd@tuned_ce": {"overrides": [f"{k}={v}" for k, v in SKD_TUNED_CE.items()],
                            "note": "kd+skd@tuned with tuned KD's CE weight "
                                    f"({SKD_TUNED_CE['method.ce_weight']:.3g}) instead of its config's 0.1"}}
       if SKD_TUNED_KD and SKD_TUNED_CE["method.ce_weight"] is not None else {}),
}, "digits": {"kd+skd@no_simplifier_ce": NO_SIMPLIFIER_CE}}
CONTROL_TEACHERS = {"teacher15": ["optim.epochs=15"]}  # kind -> its overrides on top of the protocol
# The teacher's choice rule: the best validation epoch, or the last (a cosine schedule ends annealed, and a
# 1,000-image validation split picks noise among the last epochs).
TEACHER_KEEP = {"digits": "best", "cifar10": "best", "cifar10_15": "last"}
# Datasets whose teachers are committed (results/teachers/<dataset>/: the weights, and their run's summary.json as
# <kind>.json): training is not bit-identical across CPU types, so a teacher retrained on another machine is
# another teacher. With the files pinned, runs made on any machine pair with the committed ones, and the table
# grows across sessions: its runs are the committed ones made against the same teacher plus this machine's.
PINNED = {"cifar10_15"}
HEADLINE = {"digits": "best_val_epoch_test", "cifar10": "best_val_epoch_test", "cifar10_15": "last_test"}
SEEDS = {"digits": list(range(10)), "cifar10": [0, 1, 2], "cifar10_15": [0, 1, 2]}  # the digits runs take seconds each
# channels_last=false, fold_frozen_batchnorm=false: every committed quality run was made before NHWC and the
# folded teacher became defaults (same numbers to float rounding, but rounding moves a 15-epoch run as much as a
# seed does); kept so the tables stay one protocol
EXACT = ["runtime.channels_last=false", "runtime.fold_frozen_batchnorm=false"]
LOCAL = ["runtime.executor=local", "runtime.threads_per_worker=2", *EXACT]


def tuned(dataset: str) -> dict[str, dict]:
    """method -> the values its validation sweep chose (benchmarks/sweeps.py); {} before any sweep."""
    path = RESULTS / f"tuned_{dataset}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def variants(dataset: str) -> list[str]:
    """Every method at its config's defaults, then `<method>@tuned` for each method swept on validation, then
    the dataset's controlled runs."""
    methods = [m for m in METHODS if m in CONFIGS[dataset]]
    return methods + [f"{m}@tuned" for m in methods if m in tuned(dataset)] + list(CONTROLS.get(dataset, {}))


def run_name(method: str) -> str:
    return method.replace("+", "_").replace("@", "-")


def out_dir(dataset: str) -> Path:
    return RUNS / "quality" / dataset


def teacher_args(dataset: str, kind: str) -> tuple[str, list[str], str]:
    """(config, overrides, keep) of the dataset's teacher (kind 'teacher', 'lwkd_teacher' or one of
    CONTROL_TEACHERS), seed 0."""
    if kind == "lwkd_teacher":  # trained on its synthesized glyphs, not on the protocol's images
        return CONFIGS[dataset][kind], [*LOCAL, f"name={kind}", f"output_dir={out_dir(dataset)}"], "best"
    extra = TEACHER_EPOCHS[dataset] if kind == "teacher" else CONTROL_TEACHERS[kind]
    return (CONFIGS[dataset]["teacher"], [*PROTOCOL[dataset], *extra, *LOCAL, f"name={kind}",
                                          f"output_dir={out_dir(dataset)}"], TEACHER_KEEP[dataset])


def pinned_dir(dataset: str) -> Path:
    return RESULTS / "teachers" / dataset


def teacher_path(dataset: str, kind: str, best: bool = False) -> Path:
    """Where a teacher kind's weights are: the committed file on a pinned dataset, else this machine's run folder
    (`best`: that run's best-validation weights instead of the kept ones)."""
    if dataset in PINNED:
        return pinned_dir(dataset) / f"{kind}{'_best' if best else ''}.pt"
    return out_dir(dataset) / kind / "best_student.pt" if best else out_dir(dataset) / f"{kind}.pt"


def teacher_summary(dataset: str, kind: str) -> dict | None:
    path = pinned_dir(dataset) / f"{kind}.json" if dataset in PINNED else out_dir(dataset) / kind / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def teacher(dataset: str, kind: str) -> str:
    """The dataset's teacher file, trained once (on a pinned dataset: once anywhere, then committed)."""
    from ray_kd.config import load_config
    from ray_kd.run import train_teacher

    path = teacher_path(dataset, kind)
    if not path.is_file():
        trained = out_dir(dataset) / f"{kind}.pt"
        if not trained.is_file():
            config, overrides, keep = teacher_args(dataset, kind)
            print(f"== training the {dataset} {kind}", flush=True)
            train_teacher(load_config(config, overrides), trained, keep=keep)
        if dataset in PINNED:  # to be committed with the results
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out_dir(dataset) / kind / "summary.json", path.with_suffix(".json"))
            if any(c.get("teacher") == kind and c.get("best") for c in CONTROLS.get(dataset, {}).values()):
                shutil.copyfile(out_dir(dataset) / kind / "best_student.pt", teacher_path(dataset, kind, best=True))
            shutil.copyfile(trained, path)
    return str(path)


def table_teacher(dataset: str) -> str | None:
    """The pinned dataset's table id: the first 12 hex digits of its teacher file's sha256 (None elsewhere)."""
    if dataset not in PINNED:
        return None
    return hashlib.sha256(Path(teacher(dataset, "teacher")).read_bytes()).hexdigest()[:12]


def run_args(dataset: str, method: str, seed: int, runtime: list[str] = LOCAL, name: str | None = None,
             output_dir: Path | None = None) -> tuple[str, list[str]]:
    """(config, overrides) of one run (by default the table's, in its run folder; a sweep names its own runtime
    and folder); a teacher file it needs is named, not trained, here."""
    from ray_kd.config import load_config

    base, _, variant = method.partition("@")
    chosen = [f"{k}={v}" for k, v in tuned(dataset)[base].items()] if variant == "tuned" else []
    overrides = [*PROTOCOL[dataset], *runtime, *chosen, *control(dataset, method).get("overrides", []),
                 f"seed={seed}", f"name={name or f'{run_name(method)}-s{seed}'}",
                 f"output_dir={output_dir or out_dir(dataset)}"]
    if load_config(CONFIGS[dataset][base], overrides).teacher is not None:
        overrides.append(f"teacher.checkpoint={teacher_file(dataset, method)}")
    return CONFIGS[dataset][base], overrides


def control(dataset: str, method: str) -> dict:
    """The controlled run's one change ({} for every other method)."""
    return CONTROLS.get(dataset, {}).get(method, {})


def teacher_kind(dataset: str, method: str) -> str:
    if method.startswith("lwkd"):
        return "lwkd_teacher"
    return control(dataset, method).get("teacher", "teacher")


def teacher_file(dataset: str, method: str) -> Path:
    """The teacher file a run of `method` loads: the kind's file, or the best-validation weights its run kept."""
    return teacher_path(dataset, teacher_kind(dataset, method), best=control(dataset, method).get("best", False))


def command(verb: str, config: str, overrides: list[str], extra: tuple[str, ...] = ()) -> str:
    """The `ray-kd` command line that does the same as this script's call (for the runs table)."""
    return shlex.join(["ray-kd", verb, "-c", config, *extra, *overrides])


def run(dataset: str, method: str, seed: int, table: str | None) -> None:
    """One run, unless its summary.json exists (or, on a pinned dataset, the committed table has it)."""
    from ray_kd.config import load_config
    from ray_kd.run import train

    folder = out_dir(dataset) / f"{run_name(method)}-s{seed}"
    if (folder / "summary.json").is_file() or (method, seed) in committed_runs(dataset, table):
        return
    config, overrides = run_args(dataset, method, seed)
    if any(o.startswith("teacher.checkpoint=") for o in overrides):
        teacher(dataset, teacher_kind(dataset, method))
    print(f"== {dataset} {method} seed {seed}", flush=True)
    if table is not None:  # the teacher its table is made against, for the runs that load none too
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table_teacher.txt").write_text(table)
    train(load_config(config, overrides))


def committed_runs(dataset: str, table: str | None) -> dict[tuple[str, int], dict]:
    """(method, seed) -> the committed record of each run made against this table's teacher (pinned datasets)."""
    path = RESULTS / f"quality_{dataset}.json"
    if table is None or not path.is_file():
        return {}
    return {(r["method"], r["seed"]): r for r in json.loads(path.read_text())["runs"]
            if r.get("table_teacher") == table and r["method"] in variants(dataset)}


def local_run(dataset: str, method: str, summary: Path, table: str | None, cpu: str) -> dict | None:
    """A finished run folder's record (made on this machine, `cpu`); None when made against another table's teacher."""
    marker = summary.parent / "table_teacher.txt"
    if table is not None and (not marker.is_file() or marker.read_text().strip() != table):
        print(f"left out {summary.parent}: made against another teacher than {table}", flush=True)
        return None
    seed = int(summary.parent.name.rpartition("-s")[2])
    s = json.loads(summary.read_text())
    student = s["roles"]["student_0"]
    return {"method": method, "seed": seed, "table_teacher": table,
            "best_val_epoch_test": student["test_acc_at_best_val"], "last_test": student["last_test_acc"],
            "best_val": student.get("val_acc_at_best", student.get("best_val_acc")), "best_epoch": student["best_epoch"],
            "dml_best_peer_test": s["roles"][s["best_student"]]["test_acc_at_best_val"],
            "wall_seconds": s["wall_seconds"], "cpu_model": cpu,
            "command": command("train", *run_args(dataset, method, seed))}


def aggregate(dataset: str, runs: list[dict]) -> list[dict]:
    """Per method: mean and std over seeds of both figures, and the paired comparison of the protocol's headline
    figure against the student alone (vs_ce) and against KD (vs_kd: for the seed methods; on cifar10_15 for
    every method): the mean and std over seeds of the same-seed difference."""
    key = HEADLINE[dataset]
    rows = []
    for method in [m for m in variants(dataset) if any(r["method"] == m for r in runs)]:
        mine = [r for r in runs if r["method"] == method]
        row = {"method": method, "seeds": len(mine)}
        for figure in ("best_val_epoch_test", "last_test"):
            xs = [r[figure] for r in mine]
            row[f"{figure}_mean"] = statistics.fmean(xs)
            row[f"{figure}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        if method == "dml":
            row["note"] = ("peer student_0; best-by-val peer: "
                           f"{statistics.fmean(r['dml_best_peer_test'] for r in mine):.2f}")
        if method.endswith("@tuned"):
            row["note"] = " ".join(f"{k.removeprefix('method.')}={v:.3g}"
                                   for k, v in tuned(dataset)[method.partition("@")[0]].items())
        row["train_minutes_per_run"] = statistics.fmean(r["wall_seconds"] for r in mine) / 60
        rows.append(row)
    present = {r["method"] for r in rows}
    every = dataset == "cifar10_15"
    for row in rows:
        method = row["method"]
        if "ce" in present and method != "ce":
            row["vs_ce"], row["vs_ce_paired_std"] = paired(differences(runs, method, "ce", key))
        kd = "kd@tuned" if method.endswith("@tuned") and "kd@tuned" in present else "kd"  # tuned against tuned
        if kd in present and method not in ("ce", kd) and (every or method.partition("@")[0] in SEED_METHODS):
            diffs = differences(runs, method, kd, key)
            row["vs_kd"], row["vs_kd_paired_std"] = paired(diffs)
            if kd == "kd@tuned":
                row["note"] = f"{verdict(diffs, kd)}; {row['note']}"
    return rows


def verdict(diffs: list[float], other: str) -> str:
    """Whether a method beats `other` in plain words, from their same-seed differences: by more than their paired
    std (above), by less either way (level), or below by more than it; and on how many seeds it is above."""
    if len(diffs) < 2:
        return f"vs {other}: one seed, no verdict"
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    words = (f"beats {other}" if mean > std else f"below {other}, does not beat it" if mean < -std
             else f"level with {other} (within the paired std), does not beat it")
    return f"{words}: above on {sum(d > 0 for d in diffs)} of {len(diffs)} seeds"


def differences(runs: list[dict], method: str, other: str, key: str) -> list[float]:
    """(method - other) on each seed both ran (same batches, same augmentation draws)."""
    by_seed = {r["seed"]: r[key] for r in runs if r["method"] == other}
    return [r[key] - by_seed[r["seed"]] for r in runs if r["method"] == method and r["seed"] in by_seed]


def paired(diffs: list[float]) -> tuple[float, float | str]:
    """Mean and std over seeds of the same-seed differences."""
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else "")


def plot(dataset: str, rows: list[dict], teachers: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["best_val_epoch_test_mean"] for r in rows], 0.4,
           yerr=[r["best_val_epoch_test_std"] for r in rows], capsize=3, label="test top-1 at the best val epoch")
    ax.bar([i + 0.2 for i in x], [r["last_test_mean"] for r in rows], 0.4,
           yerr=[r["last_test_std"] for r in rows], capsize=3, label="last-epoch test top-1")
    for kind, acc in teachers.items():
        if kind == "teacher":  # LW-KD's teacher is scored on its synthetic glyphs: not comparable here
            ax.axhline(acc, color="grey", linestyle=":", linewidth=1, label=f"teacher test top-1 {acc:.1f}")
    ax.set_xticks(list(x), [r["method"] for r in rows])
    low = min(r["last_test_mean"] - r["last_test_std"] for r in rows)
    high = max([r["best_val_epoch_test_mean"] + r["best_val_epoch_test_std"] for r in rows] + [teachers.get("teacher", 0)])
    ax.set_ylim(max(0, low - 5), min(100, high + 3))
    ax.set_ylabel("student test top-1 (%)")
    ax.set_title(f"{dataset}: mean and std over seeds")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(CONFIGS), required=True)
    parser.add_argument("--methods", nargs="+", help="default: every method and every @tuned variant")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0-9 on the digits, 0-2 on CIFAR-10")
    args = parser.parse_args()
    unknown = set(args.methods or []) - set(variants(args.dataset))
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {variants(args.dataset)}")
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:////tmp/ray-kd-bench/mlflow.db")
    Path("/tmp/ray-kd-bench").mkdir(exist_ok=True)
    info = machine()
    order = variants(args.dataset)
    table = table_teacher(args.dataset)
    for seed in args.seeds or SEEDS[args.dataset]:  # seed-major: a partial run still compares every method on the same seeds
        for method in args.methods or order:
            run(args.dataset, method, seed, table)
    runs = dict(committed_runs(args.dataset, table))  # every finished run of this table, not only this call's
    for method in order:
        for summary in sorted(out_dir(args.dataset).glob(f"{run_name(method)}-s*/summary.json")):
            if summary.parent.name.rpartition("-s")[0] != run_name(method):  # kd_skd-s* also matches kd_skd-no_simplifier_ce-s0
                continue
            record = local_run(args.dataset, method, summary, table, info["cpu_model"])
            if record is not None:
                runs[method, record["seed"]] = record
    runs = sorted(runs.values(), key=lambda r: (order.index(r["method"]), r["seed"]))
    teachers, detail, total = {}, [], sum(r["wall_seconds"] for r in runs)
    for kind in ("teacher", "lwkd_teacher", *CONTROL_TEACHERS):
        s = teacher_summary(args.dataset, kind)
        if s is not None:
            t = s["roles"].get("teacher") or s["roles"]["student_0"]  # summaries before/after issue 16
            keep = teacher_args(args.dataset, kind)[2]
            teachers[kind] = t["last_test_acc" if keep == "last" else "test_acc_at_best_val"]
            detail.append(f"{kind} (kept: {keep}): best val {t.get('val_acc_at_best', t.get('best_val_acc')):.2f} first reached at epoch {t['best_epoch']} of "
                          f"{s['epochs']}, test {t['test_acc_at_best_val']:.2f} there, {t['last_test_acc']:.2f} at the last epoch")
            total += s["wall_seconds"]
    rows = aggregate(args.dataset, runs)
    plot(args.dataset, rows, teachers, RESULTS / f"quality_{args.dataset}.png")
    controls = CONTROLS.get(args.dataset, {})
    short = [f"{r['method']} {r['vs_ce']:+.2f}" for r in rows if r.get("vs_ce", 1) <= 0 and r["method"] not in controls]
    below_kd = [f"{r['method']} {r['vs_kd']:+.2f}" for r in rows if r.get("vs_kd", 1) <= 0
                and r["method"].partition("@")[0] in SEED_METHODS and r["method"] not in controls]
    notes = (f"Student test top-1 (%), mean and sample std over seeds: at the epoch of its best validation top-1, "
             f"and at the last epoch. Protocol (fixed beforehand): {' '.join(PROTOCOL[args.dataset])}, every other "
             "setting from the method's config under configs/ (its defaults; `@tuned` rows: the values in the note column, "
             f"chosen on validation by benchmarks/sweeps.py, see sweeps_{args.dataset}.md, and their vs_kd is against kd@tuned; their note opens with the verdict: beats kd@tuned when the mean paired difference exceeds its paired std, level within it, below beyond it); teacher trained once on the same "
             f"subset ({' '.join(TEACHER_EPOCHS[args.dataset]) or 'the same schedule'}): "
             + ", ".join(f"{k} test top-1 {v:.2f}" + (" (on its synthetic glyphs)" if k == "lwkd_teacher" else "")
                        for k, v in teachers.items())
             + f". vs_ce / vs_kd: mean and std over seeds of the same-seed difference (same batches and augmentation) of the {'last-epoch test top-1' if HEADLINE[args.dataset] == 'last_test' else 'test top-1 at the best val epoch'}; train_minutes_per_run: the executor's wall time from summary.json (without MLflow set-up and model logging). Targets: every method above ce -> "
             + ("met" if not short else "missed by " + ", ".join(short))
             + "; seed methods above kd -> " + ("not run yet" if not any("vs_kd" in r for r in rows)
                                                else "met" if not below_kd else "missed by " + ", ".join(below_kd))
             + (". Controlled rows (`<method>@<change>`, issue 17), one change each from the method's row: "
                + "; ".join(f"{r['method'].partition('@')[2]} = {controls[r['method']]['note']}"
                            for r in rows if r["method"] in controls)
                if any(r["method"] in controls for r in rows) else "")
             + f". Teachers: {'; '.join(detail)}"
             + f". Per-run figures: quality_{args.dataset}_runs.md. Plot: quality_{args.dataset}.png. "
             f"Wall time of all runs (teachers included, from their summary.json): {total / 60:.1f} min.")
    save(f"quality_{args.dataset}", f"Distillation quality on {args.dataset}", rows,
         ["method", "seeds", "best_val_epoch_test_mean", "best_val_epoch_test_std", "last_test_mean",
          "last_test_std", "vs_ce", "vs_ce_paired_std", "vs_kd", "vs_kd_paired_std", "train_minutes_per_run", "note"], info, notes,
         {"runs": runs, "teachers": teachers, "protocol": PROTOCOL[args.dataset]})
    (RESULTS / f"quality_{args.dataset}_runs.md").write_text(
        f"# Every run behind quality_{args.dataset}.md\n\n" + markdown_table(
            runs,
            ["method", "seed", "best_val", "best_epoch", "best_val_epoch_test", "last_test", "wall_seconds", "cpu_model",
             "command"])
        + "\n\nTeachers:\n\n" + "\n".join(
            f"- `{command('train-teacher', c, o, ('--out', str(out_dir(args.dataset) / f'{kind}.pt'), '--keep', keep))}`"
            for kind in teachers for c, o, keep in [teacher_args(args.dataset, kind)])
        + (f"\n\nPinned (committed) teacher files: results/teachers/{args.dataset}/; this table's runs were made "
           f"against teacher.pt with sha256 {table}...\n" if table else "\n"))


if __name__ == "__main__":
    main()
