"""Evaluation report: Markdown with the paper-shaped table, ROC and calibration plots (PNG),
and every metric as JSON.

Files written to the output folder:

* ``report.md`` — tables (architecture x sequence AUC with 95 % CI, operating points at the
  Youden threshold, at sensitivity 0.85 and at the model's own threshold, per-vertebra AUC,
  calibration, DeLong tests, segmentation) and the figure checks;
* ``metrics.json`` — the same numbers, machine-readable (see :func:`train.evaluate.summarise`);
* ``roc_patient.png``, ``roc_vertebra.png``, ``calibration.png``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train.evaluate import (
    FUSED,
    Evaluation,
    ScoreTable,
    TargetCheck,
    common_patients,
)
from train.metrics import roc_curve

REPORT_NAME = "report.md"
METRICS_NAME = "metrics.json"


def _write_text(path: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def _auc_text(entry: dict[str, Any] | None, key: str = "patient_auc") -> str:
    if not entry or key not in entry:
        return "-"
    auc = entry[key]
    return f"{auc['auc']:.3f} ({auc['low']:.3f}-{auc['high']:.3f})"


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """Replace non-finite floats by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def paper_table(summary: dict[str, Any]) -> list[str]:
    """Markdown rows: architecture x (T1, T2, T1+T2) patient-level AUC with 95 % CI, plus the
    training-free rows (VBQ, oracle)."""
    methods = summary["methods"]
    lines = [
        "| Architecture | T1 | T2 | T1+T2 (fused) |",
        "|---|---|---|---|",
    ]
    for arch in dict.fromkeys(m["method"] for m in methods if m["method"] not in ("VBQ", "oracle")):
        cells = []
        for seq in ("T1", "T2", FUSED):
            entry = next(
                (m for m in methods if m["method"] == arch and m["sequence"] == seq), None
            )
            cells.append(_auc_text(entry))
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    for name in ("VBQ", "oracle"):
        entry = next((m for m in methods if m["method"] == name), None)
        if entry is None:
            continue
        label = "VBQ score (training-free)" if name == "VBQ" else "Oracle (latent marrow)"
        first = _auc_text(entry)
        row = [first, "-", "-"] if name == "VBQ" else [first, first, first]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def render_markdown(
    summary: dict[str, Any], checks: Sequence[TargetCheck] = (), figures: Sequence[str] = ()
) -> str:
    """The report as Markdown."""
    out: list[str] = [f"# {summary['title']}", ""]
    if summary.get("cohort"):
        out += [f"Cohort: {summary['cohort']}.", ""]
    out += [
        f"Patients evaluated: {summary['patients_evaluated']} of {summary['patients_total']}"
        + (
            f" ({summary['patients_without_score']} without a score from every method are left"
            " out of all comparisons)"
            if summary["patients_without_score"]
            else ""
        )
        + f"; label maps from {summary['info'].get('labelmaps', '-')}. Osteoporosis = DXA "
        "T-score <= -2.5. Confidence intervals: 95 % stratified bootstrap "
        f"({summary['bootstrap']['resamples']} resamples; vertebrae resampled by patient).",
        "",
    ]
    models = summary["info"].get("models")
    if models and any(m.get("synthetic") for m in models.values()):
        out += [
            "> Models trained on synthetic images only: these are demonstrations of the method, "
            "not clinical findings.",
            "",
        ]
    if checks:
        passed = sum(c.passed for c in checks)
        out += [
            f"## Figures ({passed} of {len(checks)} reached)",
            "",
            "| Figure | Measured | Target | Result |",
            "|---|---|---|---|",
        ]
        for check in checks:
            out.append(
                f"| {check.name} | {_num(check.value)} | {check.target} | "
                f"{'PASS' if check.passed else 'FAIL'} |"
            )
        out.append("")
    out += ["## Patient-level ROC AUC (95 % CI)", "", *paper_table(summary), ""]

    out += [
        "## Operating points (patient level)",
        "",
        "| Method | Threshold rule | Threshold | Sensitivity | Specificity | Accuracy | F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in summary["methods"]:
        for key, rule in (
            ("youden", "Youden (max J)"),
            ("sensitivity_0.85", "sensitivity >= 0.85"),
            ("model_threshold", "model's threshold"),
        ):
            point = entry.get(key)
            if point is None:
                continue
            out.append(
                f"| {entry['name']} | {rule} | {_num(point['threshold'])} | "
                f"{_num(point['sensitivity'])} | {_num(point['specificity'])} | "
                f"{_num(point['accuracy'])} | {_num(point['f1'])} |"
            )
    out += [
        "",
        "Youden and sensitivity-0.85 thresholds are chosen on the evaluated patients "
        "themselves (optimistic); the model's threshold was fixed on its validation patients "
        "before this evaluation.",
        "",
        "## Per-vertebra ROC AUC (95 % CI)",
        "",
        "| Method | Vertebrae | AUC (95 % CI) |",
        "|---|---|---|",
    ]
    for entry in summary["methods"]:
        if "vertebra_auc" in entry:
            out.append(
                f"| {entry['name']} | {entry.get('vertebrae', '-')} | "
                f"{_auc_text(entry, 'vertebra_auc')} |"
            )
    out += ["", "## Calibration", "", "| Method | Brier score | Expected calibration error |",
            "|---|---|---|"]
    for entry in summary["methods"]:
        if "brier" in entry:
            ece = entry["reliability"]["expected_calibration_error"]
            out.append(f"| {entry['name']} | {_num(entry['brier'])} | {_num(ece)} |")
    if summary["comparisons"]:
        out += [
            "",
            "## DeLong tests (paired, patient level)",
            "",
            "| A | B | AUC A | AUC B | Difference | z | p |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in summary["comparisons"]:
            out.append(
                f"| {c['a']} | {c['b']} | {_num(c['auc_a'])} | {_num(c['auc_b'])} | "
                f"{_num(c['difference'])} | {_num(c['z'], 2)} | {_num(c['p_value'], 4)} |"
            )
    seg = summary.get("segmentation")
    if seg:
        out += [
            "",
            "## Segmentation (pipeline post-processing, source grid)",
            "",
            f"{seg['series']} series, {seg['vertebrae']} reference vertebrae L1-L5; correct "
            f"level label on {_num(seg['level_accuracy'])} of them (Dice >= 0.5 with the "
            "reference vertebra of that level).",
            "",
            "| Level | Mean Dice | SD | Min |",
            "|---|---|---|---|",
        ]
        for level, value in seg["dice_mean"].items():
            out.append(
                f"| {level} | {_num(value)} | {_num(seg['dice_sd'][level])} | "
                f"{_num(seg['dice_min'][level])} |"
            )
    if figures:
        out += ["", "## Plots", ""]
        out += [f"![{Path(name).stem}]({name})" for name in figures]
    if models:
        out += ["", "## Models", "", "| Model | Architecture | Version | Input | Training data |",
                "|---|---|---|---|---|"]
        for name, m in models.items():
            out.append(
                f"| {name} | {m.get('architecture')} | {m.get('version')} | "
                f"{m.get('input_size')} px | {m.get('training_data')} |"
            )
    out.append("")
    return "\n".join(out)


def _plot_roc(methods: Sequence[ScoreTable], mask: np.ndarray, path: Path, vertebra: bool) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 6.0), dpi=100)
    drawn = 0
    keep_ids = set(np.asarray(methods[0].patient_ids, dtype=object)[mask].tolist())
    for table in methods:
        if vertebra:
            rows = np.array([pid in keep_ids for pid in table.vertebra_patient_ids], dtype=bool)
            if not rows.any():
                continue
            y, s = table.vertebra_labels[rows], table.vertebra_scores[rows]
        else:
            y, s = table.labels[mask], table.scores[mask]
        if len(y) == 0 or y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, s)
        from train.metrics import roc_auc

        style = "--" if table.method in ("VBQ", "oracle") else "-"
        ax.plot(fpr, tpr, style, label=f"{table.name} (AUC {roc_auc(y, s):.3f})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC, " + ("per vertebra" if vertebra else "per patient"))
    ax.legend(loc="lower right", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _plot_calibration(summary: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [m for m in summary["methods"] if "reliability" in m]
    if not entries:
        return False
    fig, ax = plt.subplots(figsize=(6.0, 6.0), dpi=100)
    for entry in entries:
        curve = entry["reliability"]
        ax.plot(
            curve["mean_predicted"], curve["observed"], "o-",
            label=f"{entry['name']} (Brier {entry['brier']:.3f})",
        )
    ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8, label="perfect calibration")
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("observed fraction with osteoporosis")
    ax.set_title("Reliability (patient level, 10 bins)")
    ax.legend(loc="upper left", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(
    evaluation: Evaluation,
    summary: dict[str, Any],
    out_dir: Path,
    checks: Sequence[TargetCheck] = (),
) -> Path:
    """Write ``report.md``, ``metrics.json`` and the PNG plots; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mask = common_patients(evaluation.methods)
    figures: list[str] = []
    if _plot_roc(evaluation.methods, mask, out_dir / "roc_patient.png", vertebra=False):
        figures.append("roc_patient.png")
    cnn_and_vbq = [t for t in evaluation.methods if len(t.vertebra_scores)]
    if cnn_and_vbq and _plot_roc(cnn_and_vbq, mask, out_dir / "roc_vertebra.png", vertebra=True):
        figures.append("roc_vertebra.png")
    if _plot_calibration(summary, out_dir / "calibration.png"):
        figures.append("calibration.png")
    payload = dict(summary)
    payload["figures"] = [c.__dict__ for c in checks]
    _write_text(
        out_dir / METRICS_NAME,
        json.dumps(_clean(payload), indent=2, default=_json_default) + "\n",
    )
    report = out_dir / REPORT_NAME
    _write_text(report, render_markdown(summary, checks, figures))
    return report
