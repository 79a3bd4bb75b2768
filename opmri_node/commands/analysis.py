"""``opmri-node analyze``: run the analysis pipeline offline on a folder of DICOM files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.console import Console

    from pipeline.result import StudyResult

EXIT_NOT_ANALYSABLE = 3


def register(group: click.Group) -> None:
    """Add this module's commands to the top-level CLI group."""
    group.add_command(analyze)


def _study_files(study_dir: Path) -> list[Path]:
    return sorted(
        path
        for path in study_dir.rglob("*")
        if path.is_file() and not path.name.startswith(".")
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_result(result: StudyResult, console: Console) -> None:
    """Per-vertebra table, skipped series and the patient verdict of a result."""
    from rich.panel import Panel
    from rich.table import Table

    from pipeline.labels import LUMBAR_LEVELS
    from pipeline.privacy import uid_tag

    if result.demo_models:
        console.print(f"[bold yellow]{result.notice}[/]")
    t1, t2 = result.series_for("T1"), result.series_for("T2")
    if result.series:
        table = Table(title=f"Study {uid_tag(result.study_instance_uid)}: vertebrae")
        table.add_column("Level")
        for series in (t1, t2):
            if series is not None:
                number = "?" if series.series_number is None else series.series_number
                name = f"{series.sequence} (#{number})"
                table.add_column(f"{name} p", justify="right")
                table.add_column(f"{name} ml", justify="right")
        if t1 is not None and t1.vbq is not None:
            table.add_column("T1 trabecular signal", justify="right")
        for level in LUMBAR_LEVELS:
            row = [level]
            for series in (t1, t2):
                if series is None:
                    continue
                info = series.level(level)
                row += [
                    _fmt(info.probability) if info.found else "not found",
                    _fmt(info.volume_ml, 1) if info.found else "-",
                ]
            if t1 is not None and t1.vbq is not None:
                row.append(_fmt(t1.level(level).trabecular_signal, 1))
            table.add_row(*row)
        console.print(table)
    if result.skipped:
        skipped = Table(title="Series not analysed")
        skipped.add_column("Series", justify="right")
        skipped.add_column("Description")
        skipped.add_column("Images", justify="right")
        skipped.add_column("Reason")
        for entry in result.skipped:
            number = "?" if entry.series_number is None else str(entry.series_number)
            skipped.add_row(number, entry.description, str(entry.n_instances), entry.reason)
        console.print(skipped)
    patient = result.patient
    if not result.analysed or patient is None:
        console.print(
            Panel(f"[bold]Not analysable[/]: {result.reason}", title="Patient", expand=False)
        )
        return
    verdict = "[bold red]POSITIVE[/]" if patient.osteoporosis else "[bold green]negative[/]"
    lines = [
        f"Osteoporosis: {verdict}  (probability {_fmt(patient.probability)}, "
        f"threshold {_fmt(patient.threshold)}; from {' + '.join(patient.sequences)})",
        f"T1 probability {_fmt(patient.probability_t1)}   T2 probability "
        f"{_fmt(patient.probability_t2)}",
    ]
    if t1 is not None and t1.vbq is not None:
        if t1.vbq.score is not None:
            lines.append(
                f"VBQ score {t1.vbq.score:.2f} (CSF at {t1.vbq.csf_level}; training-free baseline)"
            )
        else:
            lines.append(f"VBQ score not available: {t1.vbq.reason}")
    lines.append(f"[dim]{result.notice}[/]")
    console.print(Panel("\n".join(lines), title="Patient", expand=False))


@click.command("analyze")
@click.argument(
    "study_dir", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for result.json and the result DICOM objects (created if missing).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Node config file whose pipeline: section is used (default: $OPMRI_CONFIG).",
)
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder with segmenter/, cls-t1/, cls-t2/ (overrides pipeline.models_dir).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Compute device (overrides pipeline.device).",
)
@click.option(
    "--no-masks", is_flag=True, help="Leave the label maps out of result.json (smaller file)."
)
def analyze(
    study_dir: Path,
    out_dir: Path,
    config_path: Path | None,
    models_dir: Path | None,
    device: str | None,
    no_masks: bool,
) -> None:
    """Analyse one study in STUDY_DIR (DICOM files, any layout) and write OUT/result.json.

    For an analysed study also writes the DICOM objects the node sends to the PACS: a SEG per
    analysed series (seg-t1.dcm, seg-t2.dcm), the TID 1500 SR (sr.dcm) and the key image
    (key-image.dcm).

    Prints a table per vertebra and the patient verdict. Exit status: 0 analysed,
    3 not analysable (no usable series or no vertebra found; the reason is printed and
    written), 1 for errors such as missing models.
    """
    from rich.console import Console

    from opmri_node.config import ConfigError, load_config
    from pipeline.device import DeviceError
    from pipeline.files import atomic_write
    from pipeline.registry import ModelRegistryError

    console = Console()
    try:
        settings = load_config(config_path).pipeline
    except ConfigError as exc:
        raise click.ClickException(f"invalid configuration:\n{exc}") from exc
    updates: dict[str, object] = {}
    if models_dir is not None:
        updates["models_dir"] = models_dir.resolve()
    if device is not None:
        updates["device"] = device
    if updates:
        settings = settings.model_copy(update=updates)
    files = _study_files(study_dir)
    if not files:
        raise click.ClickException(f"{study_dir} holds no files")

    from pipeline.analyze import Analyzer

    with console.status("Loading models..."):
        try:
            analyzer = Analyzer(settings)
        except (ModelRegistryError, DeviceError) as exc:
            raise click.ClickException(str(exc)) from exc
    with console.status(f"Analysing {len(files)} files..."):
        result = analyzer.analyze_study(files)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "result.json"
    atomic_write(json_path, (result.to_json(include_masks=not no_masks) + "\n").encode())
    written = [json_path]
    problem = None
    if result.analysed:
        from pipeline.dicom_out import SourceError, build_result_objects, write_result_files

        try:
            written += write_result_files(build_result_objects(result), out_dir)
        except SourceError as exc:
            problem = f"the DICOM result objects were not written: {exc}"
    print_result(result, console)
    timings = ", ".join(f"{name} {seconds:.2f}" for name, seconds in result.timings.items())
    console.print(f"[dim]Seconds: model load {analyzer.load_seconds:.2f}; {timings}[/]")
    for path in written:
        console.print(f"Wrote {path}")
    if problem is not None:
        raise click.ClickException(problem)
    if not result.analysed:
        raise SystemExit(EXIT_NOT_ANALYSABLE)
