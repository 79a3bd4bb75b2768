"""Model commands: ``train seg|cls``, ``evaluate``, ``models build-demo`` and ``models list``.

Data come from one of three sources, chosen by option:

* ``--synthetic N --seed S``: the synthetic cohort, simulated in memory;
* ``--site-cohort FILE.csv``: a hospital's DICOM studies with DXA results (docs/training.md);
* ``--public-dataset DIR`` (segmenter only): images + label masks in the SPIDER layout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click

if TYPE_CHECKING:
    from rich.console import Console

    from train.datasets import PatientSample


def _console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def _training_config(path: Path | None) -> Any:
    from train.config import TrainingConfigError, load_training_config

    try:
        return load_training_config(path)
    except TrainingConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _overrides(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Training config YAML (see config/train.example.yaml); options override it.",
)
synthetic_option = click.option(
    "--synthetic",
    "n_synthetic",
    type=click.IntRange(4, 100_000),
    default=None,
    help="Use N patients of the synthetic cohort (simulated in memory).",
)
seed_option = click.option(
    "--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
    help="Seed of the synthetic cohort, the split and the training.",
)  # fmt: skip
site_option = click.option(
    "--site-cohort",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CSV of patients, study folders and DXA results (see docs/training.md).",
)
device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
    help="Compute device (default: the config's, else auto).",
)  # fmt: skip


def _load_patients(
    console: Console,
    *,
    n_synthetic: int | None,
    seed: int,
    site_cohort: Path | None,
    public_dataset: Path | None = None,
    segmenter_dir: Path | None = None,
    device: str = "auto",
) -> tuple[list[PatientSample], str]:
    """Patients from exactly one source, with a description of the data."""
    chosen = [x is not None for x in (n_synthetic, site_cohort, public_dataset)]
    if sum(chosen) != 1:
        names = "--synthetic, --site-cohort" + (
            " or --public-dataset" if public_dataset is not None or segmenter_dir is None else ""
        )
        raise click.UsageError(f"give exactly one data source: {names}")
    from train.progress import Step, make_progress

    if n_synthetic is not None:
        from train.synthetic import cohort_options, describe, synthetic_patients

        with make_progress(console) as progress:
            task = Step(progress, "simulate synthetic patients", n_synthetic)
            patients = synthetic_patients(
                seed, n_synthetic, options=cohort_options(seed, n_synthetic),
                on_patient=task.advance,
            )  # fmt: skip
        return patients, describe(seed, n_synthetic)
    if public_dataset is not None:
        from train.public_layout import (
            PublicDatasetError,
            load_public_case,
            read_layout_options,
            scan_public_dataset,
        )

        try:
            options = read_layout_options(public_dataset)
            cases = scan_public_dataset(public_dataset)
            with make_progress(console) as progress:
                task = Step(progress, "read public dataset", len(cases))
                patients = []
                for case in cases:
                    patients.append(load_public_case(case, options))
                    task.advance()
        except PublicDatasetError as exc:
            raise click.ClickException(str(exc)) from exc
        return patients, f"public dataset {public_dataset.name}, {len(patients)} cases"
    assert site_cohort is not None
    import torch

    from pipeline.device import resolve_device
    from pipeline.registry import SEGMENTER, ModelRegistryError, load_model
    from train.site_cohort import SiteCohortError, load_site_patient, read_site_cohort

    try:
        cohort = read_site_cohort(site_cohort)
    except SiteCohortError as exc:
        raise click.ClickException(str(exc)) from exc
    torch_device = resolve_device(device)
    segmenter = None
    needs_segmenter = any(len(row.masks) < 2 for row in cohort.rows)
    if needs_segmenter and segmenter_dir is not None:
        try:
            segmenter = load_model(segmenter_dir, SEGMENTER, torch_device)
        except ModelRegistryError as exc:
            raise click.ClickException(
                f"some patients have no mask files and the segmenter cannot be loaded: {exc}"
            ) from exc
    patients = []
    issues: list[str] = []
    with make_progress(console) as progress:
        task = Step(progress, "load site cohort studies", len(cohort.rows))
        for row in cohort.rows:
            try:
                patients.append(
                    load_site_patient(row, segmenter=segmenter, device=torch_device)
                )
            except SiteCohortError as exc:
                issues += exc.issues
            task.advance()
    if issues:
        raise click.ClickException(str(SiteCohortError(issues)))
    _ = torch
    return patients, f"site cohort {site_cohort.name}, {len(patients)} patients"


def _split(
    patients: list[PatientSample], fraction: float, seed: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from train.datasets import patient_labels
    from train.splits import train_validation_split

    ids, labels = patient_labels(patients)
    if labels.all() or not labels.any():
        # Segmentation-only data (public datasets) carry no DXA: a plain random split.
        labels = labels & False
    if len(ids) < 2:
        raise click.ClickException("at least two patients are needed (training + validation)")
    return train_validation_split(ids, labels, fraction, seed)


# -- train ---------------------------------------------------------------------------------


@click.group("train")
def train_group() -> None:
    """Train the segmenter or a per-sequence classifier on synthetic or site data."""


@train_group.command("seg")
@config_option
@synthetic_option
@seed_option
@site_option
@click.option(
    "--public-dataset", type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None, help="Folder in the public-dataset layout (images/, masks/).",
)  # fmt: skip
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Models folder to write segmenter/ into.",
)  # fmt: skip
@click.option("--input-size", type=click.IntRange(32, 1024), default=None)
@click.option("--steps", type=click.IntRange(1), default=None, help="Optimiser steps.")
@click.option("--batch-size", type=click.IntRange(1), default=None)
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--eval-every", type=click.IntRange(1), default=None)
@click.option("--time-budget", type=click.FloatRange(min=1), default=None,
              help="Stop at the first validation after this many seconds.")  # fmt: skip
@click.option("--no-augment", is_flag=True, help="Train without augmentation.")
@device_option
def train_seg(
    config_path: Path | None,
    n_synthetic: int | None,
    seed: int,
    site_cohort: Path | None,
    public_dataset: Path | None,
    out_dir: Path,
    input_size: int | None,
    steps: int | None,
    batch_size: int | None,
    learning_rate: float | None,
    eval_every: int | None,
    time_budget: float | None,
    no_augment: bool,
    device: str | None,
) -> None:
    """Train the vertebral-body segmenter (MONAI UNet, Dice + cross-entropy).

    Validates on whole series with the pipeline's post-processing (Dice per level, level
    labels), keeps the best checkpoint and writes OUT/segmenter/ with its manifest. A rerun
    with the same data and settings resumes from OUT/.checkpoints/segmenter.
    """
    from pipeline.registry import SEGMENTER, save_model, segmenter_manifest
    from train.datasets import build_slice_set
    from train.progress import Step, make_progress
    from train.seg_trainer import train_segmenter

    console = _console()
    file = _training_config(config_path)
    config = file.segmenter.model_copy(
        update=_overrides(
            input_size=input_size, steps=steps, batch_size=batch_size,
            learning_rate=learning_rate, eval_every=eval_every, time_budget_s=time_budget,
            device=device, seed=seed, augment=False if no_augment else None,
        )
    )  # fmt: skip
    config = type(config).model_validate(config.model_dump())
    patients, description = _load_patients(
        console, n_synthetic=n_synthetic, seed=seed, site_cohort=site_cohort,
        public_dataset=public_dataset, device=config.device,
    )  # fmt: skip
    train_ids, val_ids = _split(patients, file.validation_fraction, seed)
    train_set = [p for p in patients if p.patient_id in set(train_ids)]
    val_set = [p for p in patients if p.patient_id in set(val_ids)]
    start = time.perf_counter()
    with make_progress(console) as progress:
        task = Step(progress, "segmenter slices", len(train_set))
        slices = build_slice_set(train_set, config.input_spec(), on_patient=task.advance)
        task.finish()
        result = train_segmenter(
            slices, val_set, config, checkpoint_dir=out_dir / ".checkpoints" / "segmenter",
            progress=progress,
        )  # fmt: skip
    metrics = result.metrics()
    manifest = segmenter_manifest(
        version=f"trained-{time.strftime('%Y%m%d-%H%M%S')}",
        training_data=description,
        synthetic=n_synthetic is not None,
        params=config.unet,
        spec=config.input_spec(),
        metrics=metrics,
        notes="Schedule: " + config.model_dump_json(exclude={"device"}),
    )
    written = save_model(out_dir / SEGMENTER, result.model, manifest)
    console.print(
        f"segmenter written to {out_dir / SEGMENTER} (validation Dice "
        f"{result.best.mean_dice:.3f}, correct levels {result.best.level_accuracy:.3f}, "
        f"{time.perf_counter() - start:.0f} s); sha256 {written.weights_sha256}"
    )


@train_group.command("cls")
@config_option
@click.option("--sequence", required=True, type=click.Choice(["T1", "T2"]))
@click.option(
    "--architecture", default=None,
    help="timm architecture: efficientnet_b4 (default), inception_resnet_v2, resnet50, ...",
)  # fmt: skip
@synthetic_option
@seed_option
@site_option
@click.option(
    "--segmenter-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None, help="Models folder whose segmenter makes masks missing from a site cohort.",
)  # fmt: skip
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Models folder to write cls-t1/ or cls-t2/ into.",
)  # fmt: skip
@click.option("--input-size", type=click.IntRange(16, 1024), default=None)
@click.option("--epochs", type=click.IntRange(1), default=None)
@click.option("--batch-size", type=click.IntRange(2), default=None)
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--patience", type=click.IntRange(1), default=None,
              help="Epochs without a better validation AUC before stopping.")  # fmt: skip
@click.option("--imbalance", type=click.Choice(["weighted_loss", "balanced_sampler", "none"]),
              default=None)  # fmt: skip
@click.option(
    "--pretrained", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="Local weights file to start from (e.g. ImageNet weights); default: from scratch.",
)  # fmt: skip
@click.option("--time-budget", type=click.FloatRange(min=1), default=None,
              help="Stop after the first epoch past this many seconds.")  # fmt: skip
@click.option("--no-augment", is_flag=True)
@click.option("--no-amp", is_flag=True, help="No mixed precision on CUDA.")
@device_option
def train_cls(
    config_path: Path | None,
    sequence: str,
    architecture: str | None,
    n_synthetic: int | None,
    seed: int,
    site_cohort: Path | None,
    segmenter_dir: Path | None,
    out_dir: Path,
    input_size: int | None,
    epochs: int | None,
    batch_size: int | None,
    learning_rate: float | None,
    patience: int | None,
    imbalance: str | None,
    pretrained: Path | None,
    time_budget: float | None,
    no_augment: bool,
    no_amp: bool,
    device: str | None,
) -> None:
    """Train the osteoporosis classifier of one sequence (timm, logistic loss).

    Patients are split by patient into training and validation (stratified); the epoch with
    the best patient-level validation AUC is kept and its Youden threshold recorded. Writes
    OUT/cls-t1/ or OUT/cls-t2/ with the manifest; a rerun resumes from OUT/.checkpoints.
    """
    from pydantic import ValidationError

    from pipeline.registry import CLASSIFIER_OF, classifier_manifest, save_model
    from train.cls_trainer import train_classifier
    from train.datasets import build_crop_set
    from train.progress import Step, make_progress

    console = _console()
    file = _training_config(config_path)
    try:
        config = type(file.classifier).model_validate(
            file.classifier.model_dump()
            | _overrides(
                architecture=architecture, input_size=input_size, epochs=epochs,
                batch_size=batch_size, learning_rate=learning_rate, patience=patience,
                imbalance=imbalance, pretrained=pretrained, time_budget_s=time_budget,
                device=device, seed=seed, augment=False if no_augment else None,
                amp=False if no_amp else None,
            )
        )  # fmt: skip
    except ValidationError as exc:
        raise click.ClickException(str(exc)) from exc
    patients, description = _load_patients(
        console, n_synthetic=n_synthetic, seed=seed, site_cohort=site_cohort,
        segmenter_dir=segmenter_dir, device=config.device,
    )  # fmt: skip
    train_ids, val_ids = _split(patients, file.validation_fraction, seed)
    seq: Literal["T1", "T2"] = "T1" if sequence == "T1" else "T2"
    start = time.perf_counter()
    with make_progress(console) as progress:
        task = Step(progress, f"{seq} crops", len(patients))
        crops = build_crop_set(
            patients, seq, config.preprocess_spec(), on_patient=task.advance
        )
        task.finish()
        try:
            result = train_classifier(
                crops.subset(train_ids), crops.subset(val_ids), config,
                checkpoint_dir=out_dir / ".checkpoints" / CLASSIFIER_OF[seq],
                progress=progress, description=f"train {seq} {config.architecture}",
            )  # fmt: skip
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    metrics = result.metrics()
    manifest = classifier_manifest(
        seq,
        architecture=config.architecture,
        threshold=result.threshold,
        version=f"trained-{time.strftime('%Y%m%d-%H%M%S')}",
        training_data=description,
        synthetic=n_synthetic is not None,
        spec=config.preprocess_spec(),
        metrics=metrics,
        notes="Schedule: " + config.model_dump_json(exclude={"device", "num_workers"}),
    )
    written = save_model(out_dir / CLASSIFIER_OF[seq], result.model, manifest)
    console.print(
        f"{seq} classifier written to {out_dir / CLASSIFIER_OF[seq]}: validation AUC "
        f"{result.best_val_auc:.3f} (patient), threshold {result.threshold:.3f}, stopped by "
        f"{result.stopped}, {time.perf_counter() - start:.0f} s; sha256 {written.weights_sha256}"
    )


# -- evaluate ------------------------------------------------------------------------------


@click.command("evaluate")
@config_option
@click.option(
    "--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Models to evaluate (segmenter/, cls-t1/, cls-t2/); default: the repository's models/.",
)  # fmt: skip
@synthetic_option
@seed_option
@site_option
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Folder for report.md, metrics.json and the plots (default: reports/evaluation-...).",
)  # fmt: skip
@click.option(
    "--masks", type=click.Choice(["segmenter", "reference"]), default="segmenter",
    show_default=True,
    help="Label maps for the crops: the segmenter's (end to end) or the reference masks.",
)  # fmt: skip
@click.option("--cross-validate", is_flag=True,
              help="Train and compare architectures in k-fold CV instead of scoring models.")
@click.option("--architectures", default=None,
              help="Comma-separated timm architectures for --cross-validate.")
@click.option("--folds", type=click.IntRange(2, 20), default=None)
@click.option("--input-size", type=click.IntRange(16, 1024), default=None)
@click.option("--epochs", type=click.IntRange(1), default=None)
@click.option("--bootstrap", type=click.IntRange(100, 100_000), default=None,
              help="Bootstrap resamples for the confidence intervals.")  # fmt: skip
@device_option
def evaluate_command(
    config_path: Path | None,
    models_dir: Path | None,
    n_synthetic: int | None,
    seed: int,
    site_cohort: Path | None,
    out_dir: Path | None,
    masks: str,
    cross_validate: bool,
    architectures: str | None,
    folds: int | None,
    input_size: int | None,
    epochs: int | None,
    bootstrap: int | None,
    device: str | None,
) -> None:
    """Evaluate models on held-out patients, or compare architectures by cross-validation.

    Default: run the models of --models-dir as the pipeline does on the patients (e.g. a
    synthetic cohort with a seed the models never saw) and report per-vertebra and
    per-patient ROC AUC with 95 % bootstrap CI, DeLong tests, operating points (Youden,
    sensitivity 0.85, the model's threshold), calibration, the VBQ baseline, the T1+T2 fusion
    and the segmentation's Dice per level. With --cross-validate: stratified patient-level
    k-fold training of each architecture per sequence (paper-shaped table). Writes
    OUT/report.md, OUT/metrics.json and PNG plots; prints the tables.
    """
    from pipeline.config import PipelineSettings
    from pipeline.registry import ModelRegistryError
    from train.demo import default_models_dir
    from train.evaluate import cross_validate as run_cv
    from train.evaluate import evaluate_models, summarise, target_checks
    from train.progress import make_progress
    from train.report import write_report

    console = _console()
    file = _training_config(config_path)
    settings = PipelineSettings.model_validate({"device": device or "auto"})
    n_boot = bootstrap or file.evaluation.bootstrap
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = out_dir or Path("reports") / f"evaluation-{stamp}"
    start = time.perf_counter()
    if cross_validate:
        arch_list = (
            tuple(a.strip() for a in architectures.split(",") if a.strip())
            if architectures
            else file.evaluation.architectures
        )
        config = type(file.classifier).model_validate(
            file.classifier.model_dump()
            | _overrides(input_size=input_size, epochs=epochs, device=device, seed=seed)
        )
        patients, description = _load_patients(
            console, n_synthetic=n_synthetic, seed=seed, site_cohort=site_cohort,
            segmenter_dir=models_dir, device=config.device,
        )  # fmt: skip
        with make_progress(console) as progress:
            try:
                evaluation = run_cv(
                    patients, arch_list, config, folds=folds or file.evaluation.folds,
                    seed=seed, validation_fraction=file.validation_fraction,
                    settings=settings, work_dir=out_dir / "cv-runs",
                    title="Cross-validated comparison of architectures", cohort=description,
                    progress=progress,
                )  # fmt: skip
            except ValueError as exc:
                raise click.ClickException(str(exc)) from exc
        checks: list[Any] = []
    else:
        models_dir = models_dir or default_models_dir()
        generator, count, description = _stream_patients(
            console, n_synthetic=n_synthetic, seed=seed, site_cohort=site_cohort,
            models_dir=models_dir, device=settings.device,
        )  # fmt: skip
        with make_progress(console) as progress:
            try:
                evaluation = evaluate_models(
                    models_dir, generator, n_patients=count, settings=settings,
                    use_segmenter=masks == "segmenter", title="Evaluation of trained models",
                    cohort=description, progress=progress,
                )  # fmt: skip
            except ModelRegistryError as exc:
                raise click.ClickException(str(exc)) from exc
        checks = []
    summary = summarise(evaluation, n_boot=n_boot, seed=seed)
    if not cross_validate:
        checks = target_checks(summary)
    report = write_report(evaluation, summary, out_dir, checks)
    _print_summary(console, summary, checks)
    console.print(f"Report: {report} ({time.perf_counter() - start:.0f} s)")


def _stream_patients(
    console: Console,
    *,
    n_synthetic: int | None,
    seed: int,
    site_cohort: Path | None,
    models_dir: Path,
    device: str,
) -> tuple[Any, int, str]:
    """Patients as a generator (synthetic ones are simulated one at a time)."""
    if (n_synthetic is None) == (site_cohort is None):
        raise click.UsageError("give exactly one data source: --synthetic or --site-cohort")
    if n_synthetic is not None:
        from train.phantom.simulate import simulate_patient
        from train.synthetic import cohort_options, describe, to_patient_sample

        options = cohort_options(seed, n_synthetic)
        generator = (
            to_patient_sample(simulate_patient(seed, index, options))
            for index in range(n_synthetic)
        )
        return generator, n_synthetic, describe(seed, n_synthetic).replace(
            " — not for clinical use", ""
        )
    patients, description = _load_patients(
        console, n_synthetic=None, seed=seed, site_cohort=site_cohort,
        segmenter_dir=models_dir, device=device,
    )  # fmt: skip
    return iter(patients), len(patients), description


def _print_summary(console: Console, summary: dict[str, Any], checks: list[Any]) -> None:
    from rich.table import Table

    from train.report import paper_table

    table = Table(title=f"{summary['title']}: patient-level ROC AUC (95 % CI)")
    header = paper_table(summary)[0].strip("|").split("|")
    for name in header:
        table.add_column(name.strip())
    for line in paper_table(summary)[2:]:
        table.add_row(*[cell.strip() for cell in line.strip("|").split("|")])
    console.print(table)
    seg = summary.get("segmentation")
    if seg:
        seg_table = Table(title="Segmentation (Dice per level)")
        for level in seg["dice_mean"]:
            seg_table.add_column(level, justify="right")
        seg_table.add_column("correct levels", justify="right")
        seg_table.add_row(
            *[f"{v:.3f}" if v is not None else "-" for v in seg["dice_mean"].values()],
            f"{seg['level_accuracy']:.3f}" if seg["level_accuracy"] is not None else "-",
        )
        console.print(seg_table)
    if checks:
        fig = Table(title="Figures")
        fig.add_column("figure")
        fig.add_column("measured", justify="right")
        fig.add_column("target")
        fig.add_column("result")
        for check in checks:
            value = "-" if check.value is None else f"{check.value:.3f}"
            result = "[green]PASS[/]" if check.passed else "[red]FAIL[/]"
            fig.add_row(check.name, value, check.target, result)
        console.print(fig)


# -- models --------------------------------------------------------------------------------


@click.group("models")
def models_group() -> None:
    """Build the demo models and list the models in a folder."""


@models_group.command("build-demo")
@click.option(
    "--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where to write segmenter/, cls-t1/, cls-t2/ (default: the repository's models/).",
)  # fmt: skip
@click.option("--force", is_flag=True, help="Rebuild even if valid demo models exist.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
              help="Seed of the synthetic training cohort (default: the fixed demo seed).")
@click.option("--patients", "n_patients", type=click.IntRange(8, 10_000), default=None,
              help="Synthetic training patients (default: sized for a 2-core CPU).")
@device_option
def build_demo_command(
    models_dir: Path | None,
    force: bool,
    seed: int | None,
    n_patients: int | None,
    device: str | None,
) -> None:
    """Train demo models on the synthetic cohort (segmenter, T1 and T2 classifiers).

    Deterministic (fixed seed), about fourteen minutes on a 2-core CPU; manifests say "synthetic,
    not for clinical use". Skips the build when valid demo models exist, unless --force.
    """
    from train.demo import DemoPlan, build_demo, default_models_dir

    console = _console()
    models_dir = models_dir or default_models_dir()
    plan = DemoPlan.model_validate(
        DemoPlan().model_dump() | _overrides(seed=seed, n_patients=n_patients, device=device)
    )
    try:
        result = build_demo(models_dir, plan=plan, force=force, console=console)
    except (FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not result.built:
        console.print(f"{models_dir}: {result.reason}")
        return
    _models_table(console, models_dir)
    console.print(f"Demo models built in {result.seconds:.0f} s ({result.seconds / 60:.1f} min)")


@models_group.command("list")
@click.option(
    "--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Models folder (default: the repository's models/).",
)  # fmt: skip
def list_command(models_dir: Path | None) -> None:
    """Show the models of a folder: architecture, version, input, data, threshold, integrity."""
    from train.demo import default_models_dir

    console = _console()
    models_dir = models_dir or default_models_dir()
    if not _models_table(console, models_dir):
        sys.exit(1)


def _models_table(console: Console, models_dir: Path) -> bool:
    """Print the registry; False when a model is missing or fails verification."""
    from rich.table import Table

    from pipeline.registry import MODEL_NAMES, ModelRegistryError, load_model, read_manifest

    table = Table(title=f"Models in {models_dir}")
    for column in ("model", "architecture", "version", "input", "training data", "threshold",
                   "key metric", "status"):  # fmt: skip
        table.add_column(column)
    problems: list[str] = []
    for name in MODEL_NAMES:
        try:
            manifest = read_manifest(models_dir, name)
        except ModelRegistryError as exc:
            table.add_row(name, "-", "-", "-", "-", "-", "-", "[red]missing[/]")
            problems.append(f"{name}: {exc}")
            continue
        try:
            load_model(models_dir, name, "cpu")
            status = "[green]verified[/]"
        except ModelRegistryError as exc:
            status = "[red]FAILED[/]"
            problems.append(f"{name}: {exc}")
        metric = ""
        for key in ("val_dice_mean", "val_patient_auc"):
            if key in manifest.metrics:
                metric = f"{key} {manifest.metrics[key]:.3f}"
        table.add_row(
            name,
            manifest.architecture,
            manifest.version,
            f"{manifest.input_size} px",
            manifest.training_data + (" [yellow](synthetic)[/]" if manifest.synthetic else ""),
            "-" if manifest.threshold is None else f"{manifest.threshold:.3f}",
            metric,
            status,
        )
    console.print(table)
    console.print(
        f"{len(MODEL_NAMES) - len(problems)} of {len(MODEL_NAMES)} models verified",
        soft_wrap=True, markup=False, highlight=False,
    )  # fmt: skip
    for problem in problems:
        console.print(problem, style="red", soft_wrap=True, markup=False, highlight=False)
    return not problems


def register(group: click.Group) -> None:
    """Add this module's commands to the top-level CLI group."""
    group.add_command(train_group)
    group.add_command(evaluate_command)
    group.add_command(models_group)
