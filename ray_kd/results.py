"""What a finished run's figures are: its summary (which student and epoch, their scores) and the curve plot."""

from __future__ import annotations

from pathlib import Path


def summarize(history: list[dict[str, float]], wall_seconds: float, run_id: str | None,
              names: dict[str, str] | None = None) -> dict:
    """Per head: its best-validation epoch, val and test top-1 there, and the last epoch's; the best student
    (most val top-1 at its best epoch: the one whose weights are saved) and its figures as the headline.

    Heads are shown under `names` (e.g. a `train-teacher` run's student_0 is its teacher); `best_role` is
    the role the saved weights come from, under its own name. Epochs that `eval` left unscored are
    skipped; a best epoch whose test split was not scored (eval.splits=[val]) has test_acc_at_best_val None."""
    names = names or {}
    heads = sorted({k.split("/")[0] for k in history[-1] if k.endswith("/val_acc")})
    scores = {}
    for head in heads:
        scored = (m for m in history if f"{head}/val_acc" in m)
        best = max(scored, key=lambda m: m[f"{head}/val_acc"])  # the first best epoch, as the session keeps
        scores[head] = {
            "best_epoch": int(best["epoch"]), "val_acc_at_best": best[f"{head}/val_acc"],
            "test_acc_at_best_val": best.get(f"{head}/test_acc"),
            "last_val_acc": history[-1][f"{head}/val_acc"], "last_test_acc": history[-1][f"{head}/test_acc"],
        }
    students = [h for h in heads if h.startswith("student_")]
    best_role = max(students, key=lambda h: scores[h]["val_acc_at_best"]) if students else None
    return {"roles": {names.get(h, h): s for h, s in scores.items()},
            "best_role": best_role, "best_student": names.get(best_role, best_role),
            "headline": scores[best_role] if best_role else None,
            "epochs": int(history[-1]["epoch"]), "wall_seconds": round(wall_seconds, 1), "mlflow_run_id": run_id}


def headline_line(summary: dict) -> str | None:
    """The run's result on the console, after its epoch lines: the headline of summary.json (None without a
    student)."""
    h = summary["headline"]
    if h is None:
        return None
    test = "not scored" if h["test_acc_at_best_val"] is None else f"{h['test_acc_at_best_val']:.2f}"
    return (f"best: {summary['best_student']} at epoch {h['best_epoch']} of {summary['epochs']}, val top-1 "
            f"{h['val_acc_at_best']:.2f}, test top-1 {test} (last epoch: {h['last_val_acc']:.2f} / "
            f"{h['last_test_acc']:.2f})")


def plot_curves(history: list[dict[str, float]], path: Path, title: str = "", names: dict[str, str] | None = None,
                chosen: tuple[str, int] | None = None) -> Path:
    """Top-1 of every head per epoch (val solid, test dashed), the chosen epoch of the saved model marked;
    beside it each role's total loss and learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = names or {}
    heads = sorted({k.split("/")[0] for k in history[-1] if k.endswith("/val_acc")})
    epochs = [int(m["epoch"]) for m in history]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for i, head in enumerate(heads):
        color, label = f"C{i}", names.get(head, head)
        for split, style in (("val", "-"), ("test", "--")):
            scored = [m for m in history if f"{head}/{split}_acc" in m]  # epochs eval.every skipped are gaps
            acc.plot([int(m["epoch"]) for m in scored], [m[f"{head}/{split}_acc"] for m in scored], color=color,
                     linestyle=style, marker="." if split == "val" else None, label=f"{label} {split}")
    if chosen is not None and f"{chosen[0]}/test_acc" in history[chosen[1] - 1]:
        head, epoch = chosen
        acc.axvline(epoch, color="grey", linewidth=0.8, linestyle=":")
        acc.scatter([epoch], [history[epoch - 1][f"{head}/test_acc"]], s=60, facecolors="none", edgecolors="k",
                    zorder=3, label=f"saved: {names.get(head, head)} epoch {epoch}")
    acc.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    acc.grid(alpha=0.3)
    acc.legend(fontsize=8)
    roles = sorted({k.split("/")[0] for k in history[-1] if k.endswith("/loss_total")})
    for i, role in enumerate(roles):
        loss.plot(epochs, [m[f"{role}/loss_total"] for m in history], color=f"C{heads.index(role) if role in heads else i}",
                  label=f"{names.get(role, role)} loss")
    loss.set(xlabel="epoch", ylabel="training loss (total)", title="loss and learning rate")
    loss.grid(alpha=0.3)
    lrs = sorted({k for k in history[-1] if k.endswith("/lr")})
    if lrs:
        lr_axis = loss.twinx()
        lr_axis.plot(epochs, [m[lrs[0]] for m in history], color="grey", linestyle=":", label="lr")
        lr_axis.set_ylabel("learning rate")
        lr_axis.legend(fontsize=8, loc="upper center")
    if roles:
        loss.legend(fontsize=8)
    for ax in (acc, loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
