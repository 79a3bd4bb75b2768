"""``opmri-node synth`` (write a synthetic lumbar MRI cohort) and ``synth-report``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

_VENDORS = ("siemens", "ge", "philips", "canon")
_SERIES = ("localizer", "t1", "t2", "stir", "axial_t2")
_TRANSFER_SYNTAXES = (
    "explicit-le", "implicit-le", "deflated-le", "explicit-be", "rle", "jpeg-ls", "jpeg2000",
)  # fmt: skip


def _print_summary(report: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    prevalence = report["prevalence"]
    table.add_row("patients", str(report["n_patients"]), "")
    table.add_row(
        "osteoporosis prevalence",
        f"{prevalence['osteoporosis']:.1%}",
        "{:.0%}-{:.0%}".format(*report["targets"]["osteoporosis_prevalence"]),
    )
    table.add_row(
        "osteopenia / normal", f"{prevalence['osteopenia']:.1%} / {prevalence['normal']:.1%}", ""
    )
    vbq = report["vbq"]
    if vbq.get("auc") is not None:
        low, high = vbq["ci95"]
        table.add_row(
            "VBQ AUC (95 % CI)",
            f"{vbq['auc']:.3f} ({low:.3f}-{high:.3f})",
            "{:.2f}-{:.2f}".format(*report["targets"]["vbq_auc"]),
        )
        for field, entry in vbq.get("by_field_strength", {}).items():
            auc = f"AUC {entry['auc']:.3f}, " if "auc" in entry else ""
            table.add_row(
                f"  VBQ at {field} T", f"{auc}mean {entry['mean']:.2f} (n={entry['n']})", ""
            )
    else:
        table.add_row("VBQ AUC", "n/a (needs both classes)", "")
    oracle = report["oracle"]
    if oracle.get("auc") is not None:
        low, high = oracle["ci95"]
        table.add_row("oracle AUC (95 % CI)", f"{oracle['auc']:.3f} ({low:.3f}-{high:.3f})", "< 1")
    else:
        table.add_row("oracle AUC", "n/a (needs two patients per class)", "")
    if report.get("latent_auc") is not None:
        table.add_row("latent density AUC", f"{report['latent_auc']:.3f}", "")
    ff = report["fat_fraction"]
    for name, entry in ff["by_class"].items():
        table.add_row(
            f"marrow fat fraction, {name}", f"{entry['mean']:.1%} ± {entry['sd']:.1%}", ""
        )
    if ff.get("corr_with_t_score") is not None:
        table.add_row("fat fraction vs T-score (r)", f"{ff['corr_with_t_score']:.2f}", "≈ -0.6")
    console.print(table)
    if not report.get("within_targets", False) and vbq.get("auc") is not None:
        console.print(
            "[yellow]note:[/] the VBQ AUC or the prevalence is outside its target range "
            "(small cohorts scatter widely; calibrate on 200 or more patients)."
        )


def register(group: click.Group) -> None:
    """Add this module's commands to the top-level CLI group."""

    @group.command("synth")
    @click.option(
        "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
        help="Folder to write the cohort into (created if missing).",
    )  # fmt: skip
    @click.option("--patients", "n_patients", required=True, type=click.IntRange(1, 100_000),
                  help="Number of patients (one MR study each).")  # fmt: skip
    @click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
                  help="Random seed; the same seed writes identical files.")  # fmt: skip
    @click.option("--prevalence", default=0.35, show_default=True,
                  type=click.FloatRange(0.05, 0.9),
                  help="Target share of patients with DXA osteoporosis (T <= -2.5).")  # fmt: skip
    @click.option("--vendor", "vendors", multiple=True, type=click.Choice(_VENDORS),
                  help="Vendor header style(s) to draw from (repeatable; default: all)."
                  )  # fmt: skip
    @click.option("--field-strength", "field_strengths", multiple=True,
                  type=click.Choice(["1.5", "3", "3.0"]),
                  help="Field strength(s) in tesla (repeatable; default: 1.5 and 3).")  # fmt: skip
    @click.option("--matrix", "matrices", multiple=True, type=click.Choice(["320", "512"]),
                  help="Image matrix(es) of the sagittal and axial series (repeatable; "
                  "default: 320).")  # fmt: skip
    @click.option("--transfer-syntax", default="explicit-le", show_default=True,
                  type=click.Choice(_TRANSFER_SYNTAXES),
                  help="Transfer syntax of the files (all lossless).")  # fmt: skip
    @click.option("--series", "series", multiple=True, type=click.Choice(_SERIES),
                  help="Series to write (repeatable; default: all five).")  # fmt: skip
    @click.option("--workers", default=None, type=click.IntRange(1, 64),
                  help="Worker processes (default: 2, or 1 on a single CPU).")  # fmt: skip
    @click.option("--no-progress", is_flag=True, help="Do not show the progress bar.")
    def synth(
        out_dir: Path,
        n_patients: int,
        seed: int,
        prevalence: float,
        vendors: tuple[str, ...],
        field_strengths: tuple[str, ...],
        matrices: tuple[str, ...],
        transfer_syntax: str,
        series: tuple[str, ...],
        workers: int | None,
        no_progress: bool,
    ) -> None:
        """Write a synthetic lumbar spine MRI cohort with DXA-like labels.

        Per patient one MR study (3-plane localizer, sagittal T1, T2 and STIR, axial T2) as
        single-frame MR Image Storage files under OUT/studies/<patient>/, ground-truth
        vertebral-body and CSF label maps under OUT/masks/<patient>/, one row in
        OUT/labels.csv, and the calibration report (VBQ and oracle AUC) in
        OUT/calibration.json.
        """
        from pydantic import ValidationError

        from train.phantom import CohortOptions, generate_cohort

        settings: dict[str, Any] = {
            "n_patients": n_patients,
            "seed": seed,
            "prevalence": prevalence,
            "transfer_syntax": transfer_syntax,
        }
        if vendors:
            settings["vendors"] = vendors
        if field_strengths:
            settings["field_strengths"] = tuple(float(v) for v in field_strengths)
        if matrices:
            settings["matrix"] = tuple(int(v) for v in matrices)
        if series:
            settings["series"] = series
        try:
            options = CohortOptions(**settings)
        except ValidationError as exc:
            raise click.UsageError(
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            ) from exc
        try:
            labels = generate_cohort(out_dir, options, progress=not no_progress, workers=workers)
        except OSError as exc:
            raise click.ClickException(f"cannot write the cohort: {exc}") from exc
        report = json.loads((out_dir / "calibration.json").read_text(encoding="utf-8"))
        _print_summary(report, f"Synthetic cohort: {n_patients} patients, seed {seed}")
        click.echo(f"labels: {labels}")

    @group.command("synth-report")
    @click.argument("cohort_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("--no-write", is_flag=True,
                  help="Only print; do not rewrite calibration.json and the ROC plot.")  # fmt: skip
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    def synth_report(cohort_dir: Path, no_write: bool, as_json: bool) -> None:
        """Recompute the calibration report of a cohort folder from its DICOM files and masks.

        The VBQ score (median L1-L4 T1 marrow signal over the CSF at L3) is computed from each
        patient's sagittal T1 series and its ground-truth mask; the oracle AUC from the
        noise-free marrow values in labels.csv.
        """
        from train.phantom.calibration import CalibrationError, report_for_cohort, write_report
        from train.phantom.labels import LabelsError

        try:
            report, records = report_for_cohort(cohort_dir, progress=not as_json)
        except (LabelsError, CalibrationError, OSError) as exc:
            raise click.ClickException(str(exc)) from exc
        if not no_write:
            write_report(report, cohort_dir, records)
        if as_json:
            summary = {key: value for key, value in report.items() if key != "patients"}
            click.echo(json.dumps(summary, indent=2))
        else:
            _print_summary(report, f"Calibration of {cohort_dir}")
