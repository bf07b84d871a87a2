"""What a finished run leaves behind: summary.json, the accuracy-curve plot, the best student's weights."""

from __future__ import annotations

from pathlib import Path

from ray_kd.checkpoint import atomic_write_json


def summarize(history: list[dict[str, float]], wall_seconds: float, run_id: str | None) -> dict:
    """Each head's best val top-1 (and test top-1 at that epoch) and last val/test; the best student."""
    heads = sorted({k.split("/")[0] for k in history[-1] if k.endswith("/val_acc")})
    roles = {}
    for head in heads:
        best = max(history, key=lambda m: m[f"{head}/val_acc"])
        roles[head] = {
            "best_val_acc": best[f"{head}/val_acc"], "test_acc_at_best_val": best[f"{head}/test_acc"],
            "best_epoch": int(best["epoch"]),
            "last_val_acc": history[-1][f"{head}/val_acc"], "last_test_acc": history[-1][f"{head}/test_acc"],
        }
    students = [h for h in heads if h.startswith("student_")]
    best_student = max(students, key=lambda h: roles[h]["best_val_acc"]) if students else None
    return {"roles": roles, "best_student": best_student, "epochs": int(history[-1]["epoch"]),
            "wall_seconds": round(wall_seconds, 1), "mlflow_run_id": run_id}


def write_summary(summary: dict, run_dir: Path) -> Path:
    path = run_dir / "summary.json"
    atomic_write_json(summary, path)
    return path


def plot_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Val (solid) and test (dashed) top-1 of every head per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = sorted({k.split("/")[0] for k in history[-1] if k.endswith("/val_acc")})
    epochs = [int(m["epoch"]) for m in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, head in enumerate(heads):
        color = f"C{i}"
        ax.plot(epochs, [m[f"{head}/val_acc"] for m in history], color=color, label=f"{head} val")
        ax.plot(epochs, [m[f"{head}/test_acc"] for m in history], color=color, linestyle="--", label=f"{head} test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
