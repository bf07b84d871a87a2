"""A registered model version labelled for review: its alias, and tags saying what it is and what it buys.

`tracking.register_model` registers the run's shipped student; the new version gets the alias
`tracking.register_alias` (default `candidate`), which a reviewer moves (e.g. to `production`) once they
accept it, and tags a registry page can be filtered on: the method, the teacher, the test top-1 and the
card's ratios against the teacher."""

from __future__ import annotations


def version_tags(cfg, summary: dict) -> dict[str, str]:
    head, card = summary["headline"], summary.get("card") or {}
    tags = {"ray_kd.method": cfg.method.name, "ray_kd.teacher": cfg.teacher.model if cfg.teacher else "none",
            "ray_kd.student": card.get("student", {}).get("model", summary["best_student"]),
            "ray_kd.run_name": cfg.name, "ray_kd.dataset": cfg.data.dataset,
            "ray_kd.test_acc": "not scored" if head["test_acc_at_best_val"] is None
            else f"{head['test_acc_at_best_val']:.2f}"}
    tags.update({f"ray_kd.card.{k}_ratio": f"{v:.3g}" for k, v in card.get("ratios", {}).items()})
    if card.get("acc_gap") is not None:
        tags["ray_kd.card.acc_gap"] = f"{card['acc_gap']:+.2f}"
    return tags


def label_version(client, cfg, summary: dict, version) -> None:
    """Set `tracking.register_alias` on version `version` of `tracking.register_model`, and tag it."""
    name, version = cfg.tracking.register_model, str(version)
    client.set_registered_model_alias(name, cfg.tracking.register_alias, version)
    for key, value in version_tags(cfg, summary).items():
        client.set_model_version_tag(name, version, key, value)
