"""`m3dm`: the command line. Each command parses options into frozen configs and calls one function."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

app = typer.Typer(
    help="M3DM-Fleet: multimodal (RGB + 3D) industrial anomaly detection.", no_args_is_help=True
)
data_app = typer.Typer(help="Inspect data sets in the MVTec 3D-AD layout.", no_args_is_help=True)
bundle_app = typer.Typer(help="Signed model bundles: keys, build, verify, inspect.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bundle_app, name="bundle")

F = TypeVar("F", bound=Callable[..., object])
log = logging.getLogger("m3dm")


def cli_errors(func: F) -> F:
    """Turn our typed errors into one-line reasons and a non-zero exit, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        from core.errors import M3DMError
        from trainer.progress import setup_logging

        setup_logging()
        try:
            return func(*args, **kwargs)
        except M3DMError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except Exception as err:  # protocol errors (bundle) share this exit path
            if type(err).__module__.startswith("protocol"):
                typer.echo(f"error: {type(err).__name__}: {err}", err=True)
                raise typer.Exit(1) from None
            raise

    return wrapper  # type: ignore[return-value]


def require_data_root(root: Path) -> None:
    """A data-set root that is not there is the user's typo, not a missing class: say so first."""
    from core.errors import ConfigError

    if not root.exists():
        raise ConfigError(f"data root {root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"data root {root} is not a folder")


def emit_json(payload: object) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@app.command()
@cli_errors
def synth(
    out: Annotated[Path, typer.Option(help="Output data-set root (MVTec 3D-AD layout).")],
    family: Annotated[
        str,
        typer.Option(
            help="a: our generator (training and demo); b: an independent one for evaluation only "
            "(other objects, sensor and file quirks; also writes <out>/validation_defects/)."
        ),
    ] = "a",
    seed: Annotated[int, typer.Option(help="Everything is derived from this seed.")] = 0,
    n_train: Annotated[int, typer.Option(help="Normal training scans per class.")] = 40,
    n_validation: Annotated[
        int | None, typer.Option(help="Normal validation scans per class (default 8; family b 20).")
    ] = None,
    n_test_good: Annotated[int, typer.Option(help="Normal test scans per class.")] = 10,
    n_test_per_defect: Annotated[int, typer.Option(help="Defective test scans per defect type.")] = 5,
    size: Annotated[
        int,
        typer.Option(
            help="Image width and height in pixels (224-800); family b: largest frame's longer side."
        ),
    ] = 400,
    val_defects: Annotated[
        int, typer.Option(help="Family b: validation-defect scans per defect type (model selection only).")
    ] = 3,
    classes: Annotated[
        list[str] | None, typer.Option("--class", help="Only these classes (repeatable).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes.")] = 2,
    preview: Annotated[bool, typer.Option(help="Also write preview.png, a contact sheet.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace class folders that already exist.")] = False,
    corrupt: Annotated[
        bool,
        typer.Option(
            help="Write a corrupt-data set instead: every bad-input case among n-test-good good scans of "
            "the first --class, in <class>/test/good, with expected.json naming each case's error."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Generate a deterministic, realistic structured-light data set (our stand-in sensor)."""
    from trainer.synth import CLASS_NAMES, SynthConfig, synthesize, write_preview

    if family not in ("a", "b"):
        typer.echo(f"error: --family must be a or b, got {family!r}", err=True)
        raise typer.Exit(2)
    if family == "b":
        counts = (n_train, n_validation, n_test_good, n_test_per_defect, val_defects)
        summary = _synth_family_b(out, seed, counts, size, classes, workers, overwrite)
        if preview:
            summary["preview"] = str(write_preview(out, out / "preview.png"))
        if as_json:
            emit_json(summary)
        else:
            where = summary["validation_defects"]
            typer.echo(f"wrote {out} (family b) in {summary['seconds']:.1f} s; validation defects: {where}")
        return
    n_validation = 8 if n_validation is None else n_validation
    if corrupt:
        _synth_corrupt(out, (classes or [CLASS_NAMES[0]])[0], seed, size, n_test_good, overwrite, as_json)
        return
    cfg = SynthConfig(
        seed=seed,
        classes=tuple(classes) if classes else tuple(CLASS_NAMES),
        n_train=n_train,
        n_validation=n_validation,
        n_test_good=n_test_good,
        n_test_per_defect=n_test_per_defect,
        width_px=size,
        height_px=size,
        workers=workers,
    )
    from trainer.progress import progress_callback

    with progress_callback("generating scans") as progress:
        summary = synthesize(out, cfg, progress=progress, overwrite=overwrite)
    if preview:
        summary["preview"] = str(write_preview(out, out / "preview.png"))
    if as_json:
        emit_json(summary)
    else:
        typer.echo(f"wrote {out} in {summary.get('seconds', 0):.1f} s")


def _synth_family_b(
    out: Path,
    seed: int,
    counts: tuple[int, int | None, int, int, int],
    size: int,
    classes: list[str] | None,
    workers: int,
    overwrite: bool,
) -> dict:
    """counts: train, validation (None: 20), test good, test per defect, validation defects per defect."""
    from trainer.progress import progress_callback
    from trainer.synth_b import CLASS_NAMES, SynthBConfig, synthesize_b

    n_train, n_validation, n_test_good, n_test_per_defect, val_defects = counts
    cfg = SynthBConfig(
        seed=seed,
        classes=tuple(classes) if classes else CLASS_NAMES,
        n_train=n_train,
        n_validation=20 if n_validation is None else n_validation,
        n_test_good=n_test_good,
        n_test_per_defect=n_test_per_defect,
        n_valdef_per_defect=val_defects,
        size_px=size,
        workers=workers,
    )
    with progress_callback("generating family-b scans") as progress:
        return synthesize_b(out, cfg, progress=progress, overwrite=overwrite)


def _synth_corrupt(
    out: Path, class_name: str, seed: int, size: int, n_good: int, overwrite: bool, as_json: bool
) -> None:
    from trainer.progress import progress_callback
    from trainer.synth.corrupt import write_corrupt_set

    with progress_callback("writing corrupt set") as progress:
        expected = write_corrupt_set(out, class_name, seed, size, n_good, overwrite, progress)
    if as_json:
        emit_json(expected)
    else:
        counts = expected["counts"]
        typer.echo(f"wrote {out}: {counts['good']} good and {counts['bad']} bad samples, see expected.json")


@data_app.command("info")
@cli_errors
def data_info(
    root: Annotated[Path, typer.Argument(help="Data-set root.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print counts as JSON.")] = False,
) -> None:
    """Counts per class, split and defect type."""
    from core.errors import ConfigError
    from core.mvtec3d import dataset_summary, format_summary

    require_data_root(root)
    summary = dataset_summary(root)
    if not summary:
        raise ConfigError(f"no classes found under {root} (expected <class>/train/good/rgb/*.png ...)")
    if as_json:
        emit_json(summary)
    else:
        typer.echo(format_summary(summary, {name: _data_kind(root, name) for name in summary}))


def _data_kind(root: Path, class_name: str) -> str:
    """What `m3dm train` will make of a class: full M3DM, the RGB bank alone, or a refusal."""
    from core.mvtec3d import xyz_coverage

    with_xyz, total = xyz_coverage(root, class_name)
    if with_xyz == total:
        return "rgb+xyz"
    if with_xyz == 0:
        return "RGB-only (no xyz/: rgb bank only)"
    return f"MIXED: {total - with_xyz} of {total} lack xyz (train refuses it)"


@app.command()
@cli_errors
def train(
    data: Annotated[Path, typer.Option(help="Data-set root (MVTec 3D-AD layout).")],
    out: Annotated[Path, typer.Option(help="Model output folder (one sub-folder per class).")],
    class_names: Annotated[
        list[str] | None, typer.Option("--class", help="Class to fit (repeatable).")
    ] = None,
    all_classes: Annotated[bool, typer.Option("--all", help="Fit every class found.")] = False,
    preset: Annotated[
        str, typer.Option(help="m3dm | m3dm-v2 | m3dm-free | m3dm-site | m3dm-random")
    ] = "m3dm-free",
    weights_dir: Annotated[Path | None, typer.Option(help="Folder holding the official checkpoints.")] = None,
    allow_random_weights: Annotated[bool, typer.Option(help="Permit the m3dm-random preset.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for coreset, UFF and DLF.")] = 0,
    uff_epochs: Annotated[int | None, typer.Option(min=1, help="Override UFF epochs (>= 1).")] = None,
    rgb_fraction: Annotated[float, typer.Option(help="Coreset share of the RGB bank's own rows.")] = 0.1,
    point_fraction: Annotated[float, typer.Option(help="Coreset share of the point bank's own rows.")] = 0.1,
    fusion_fraction: Annotated[
        float, typer.Option(help="Coreset share of the fusion bank's own rows.")
    ] = 0.1,
    max_bank_rows: Annotated[
        int | None,
        typer.Option(min=1, help="Cap on any bank's rows (default: none; a warning says when it binds)."),
    ] = None,
    false_reject_rate: Annotated[
        float, typer.Option(help="Share of validation normals the decision threshold may reject.")
    ] = 0.01,
    point_bn: Annotated[
        str | None,
        typer.Option(help="Point-MAE BatchNorm: batch (per-cloud, the original's) or stored statistics."),
    ] = None,
    coreset_device: Annotated[
        str, typer.Option(help="Torch device of the greedy coreset selection: cpu or cuda[:N].")
    ] = "cpu",
    site_steps: Annotated[
        int | None, typer.Option(min=1, help="m3dm-site: optimiser steps of the rgb encoder (default 2400).")
    ] = None,
    site_device: Annotated[
        str,
        typer.Option(help="m3dm-site: encoder training device, auto (CUDA when there is one), cpu or cuda."),
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Fit memory banks, UFF and DLF for each class; write a model folder per class.

    m3dm-site first trains each class's rgb encoder on its training normals (~75 s a class on 2 CPU cores).
    """
    from core.config import CoresetConfig
    from trainer.pipeline import train_classes

    require_data_root(data)

    coreset = CoresetConfig(
        rgb_fraction=rgb_fraction,
        point_fraction=point_fraction,
        fusion_fraction=fusion_fraction,
        max_rows=max_bank_rows,
        seed=seed,
    )
    summary = train_classes(
        data,
        out,
        class_names or [],
        all_classes,
        preset,
        weights_dir,
        allow_random_weights,
        seed,
        uff_epochs,
        coreset=coreset,
        false_reject_rate=false_reject_rate,
        point_bn=point_bn,
        site=_site_config(seed, site_steps, site_device),
        coreset_device=coreset_device,
    )
    if as_json:
        emit_json(summary)


def _site_config(seed: int, steps: int | None, device: str):  # noqa: ANN202 - SiteConfig, imported lazily
    from trainer.site.train import SiteConfig

    return SiteConfig(seed=seed, device=device, **({} if steps is None else {"steps": steps}))


@app.command("eval")
@cli_errors
def evaluate(
    data: Annotated[
        Path | None, typer.Option(help="Data-set root (MVTec 3D-AD layout); not with --seeds.")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Model folder from `m3dm train` (torch path).")] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle dir or tar (ONNX Runtime station path).")
    ] = None,
    key: Annotated[Path | None, typer.Option(help="Public key dir to verify --bundle with.")] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: <model>/report).")] = None,
    weights_dir: Annotated[Path | None, typer.Option(help="Folder holding the official checkpoints.")] = None,
    encodings: Annotated[bool, typer.Option(help="Also compare bank encodings against fp32.")] = False,
    point_bn: Annotated[
        str | None,
        typer.Option(
            help="A/B of Point-MAE BatchNorm: refit with this mode (batch|stored) and compare with --model."
        ),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Seed sweep, e.g. 0,1,2: per seed generate data, train and evaluate; print mean ± sd "
            "over seeds. Writes everything under --out (default runs/sweep)."
        ),
    ] = None,
    family: Annotated[
        list[str] | None, typer.Option(help="With --seeds: generated family a and/or b (default both).")
    ] = None,
    sweep_classes: Annotated[
        list[str] | None, typer.Option("--class", help="With --seeds: only these classes (any family).")
    ] = None,
    preset: Annotated[str, typer.Option(help="With --seeds: the preset to train.")] = "m3dm-free",
    size: Annotated[int, typer.Option(help="With --seeds: generated image size in pixels.")] = 400,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full results as JSON.")] = False,
) -> None:
    """Five-variant I-AUROC / P-AUROC / AUPRO tables, curves and heatmap overlays."""
    from trainer.evaluate import evaluate_bundle, evaluate_models

    if seeds is not None:
        if data is not None or model is not None or bundle is not None:
            typer.echo(
                "error: --seeds generates its own data and models; drop --data/--model/--bundle", err=True
            )
            raise typer.Exit(2)
        _seed_sweep(out or Path("runs/sweep"), seeds, family, sweep_classes, preset, size, as_json)
        return
    if data is None:
        typer.echo("error: give --data (or --seeds for a sweep on generated data)", err=True)
        raise typer.Exit(2)
    if (model is None) == (bundle is None):
        typer.echo("error: give exactly one of --model or --bundle", err=True)
        raise typer.Exit(2)
    require_data_root(data)
    if point_bn is not None and model is None:
        typer.echo("error: --point-bn compares two fits of a model folder; give --model", err=True)
        raise typer.Exit(2)
    if point_bn is not None:
        from trainer.point_bn_ab import point_bn_ab

        results = point_bn_ab(data, model, point_bn, weights_dir, out)
    elif model is not None:
        results = evaluate_models(data, model, out, weights_dir, encodings)
    else:
        results = evaluate_bundle(data, bundle, key, out)
    if as_json:
        emit_json(results)
    else:
        typer.echo(results.get("markdown", ""))


def _seed_sweep(
    out: Path,
    seeds: str,
    families: list[str] | None,
    classes: list[str] | None,
    preset: str,
    size: int,
    as_json: bool,
) -> None:
    from trainer.sweep import FAMILIES, SweepConfig, family_of_classes, parse_seeds, run_sweep

    by_family = family_of_classes(classes or [])
    chosen = tuple(families) if families else (tuple(by_family) if by_family else FAMILIES)
    cfg = SweepConfig(
        seeds=parse_seeds(seeds), families=chosen, classes=by_family, preset=preset, size_px=size
    )

    def report(run: object) -> None:
        log.info("sweep: family %s seed %s done", run["family"], run["seed"])  # type: ignore[index]

    summary = run_sweep(out, cfg, on_run=report)
    if as_json:
        emit_json(summary)
    else:
        typer.echo(summary["markdown"])


@app.command()
@cli_errors
def export(
    model: Annotated[Path, typer.Option(help="Model folder (or parent of class folders).")],
    weights_dir: Annotated[Path | None, typer.Option(help="Folder holding the official checkpoints.")] = None,
    engine: Annotated[
        bool, typer.Option(help="Also build TensorRT engines (needs a GPU and TensorRT).")
    ] = False,
    engine_precision: Annotated[
        str, typer.Option(help="TensorRT precision: fp32 | fp16 | int8 (int8 writes onnx/<net>.int8.calib).")
    ] = "fp16",
    as_json: Annotated[bool, typer.Option("--json", help="Print parity reports as JSON.")] = False,
) -> None:
    """Export the networks to ONNX (opset 17, dynamic batch) and check parity against torch."""
    from trainer.pipeline import export_models

    report = export_models(model, weights_dir, engine, engine_precision)
    if as_json:
        emit_json(report)


@bundle_app.command("keygen")
@cli_errors
def bundle_keygen(out: Annotated[Path, typer.Option(help="Key folder to create.")]) -> None:
    """Create an Ed25519 signing key pair (private key mode 0600)."""
    from trainer.bundle import keygen

    private, public = keygen(out)
    typer.echo(f"private key: {private}\npublic key:  {public}")


@bundle_app.command("build")
@cli_errors
def bundle_build(
    model: Annotated[Path, typer.Option(help="Exported model folder of one class.")],
    key: Annotated[Path, typer.Option(help="Key folder from `m3dm bundle keygen`.")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write (a .tar is written beside it).")],
    version: Annotated[str, typer.Option(help="Semantic version of this bundle.")] = "1.0.0",
    counter: Annotated[int, typer.Option(help="Anti-rollback counter (monotonic).")] = 1,
    expires_days: Annotated[int, typer.Option(help="Days until the bundle expires.")] = 365,
    bank_encoding: Annotated[
        str | None, typer.Option(help="fp32 | fp16 | int8 | pq (default: by budget)")
    ] = None,
    bank_budget_mb: Annotated[float | None, typer.Option(help="Size budget for all banks together.")] = None,
    data: Annotated[Path | None, typer.Option(help="Data root to draw golden samples from.")] = None,
    weights_dir: Annotated[
        Path | None, typer.Option(help="Official checkpoints (only to export a not-yet-exported model).")
    ] = None,
    precision: Annotated[
        str, typer.Option(help="Network precision: fp32, or int8 (ONNX Runtime int8 graphs + the fp32 ones).")
    ] = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest summary as JSON.")] = False,
) -> None:
    """Build and sign a bundle: ONNX graphs, encoded banks, UFF/DLF, thresholds, golden samples.

    A model folder that was never exported is exported first (ONNX + parity check)."""
    from trainer.bundle_build import build_model_bundle

    summary = build_model_bundle(
        model,
        key,
        out,
        version,
        counter,
        expires_days,
        bank_encoding,
        bank_budget_mb,
        data,
        weights_dir,
        precision=precision,
    )
    if as_json:
        emit_json(summary)
    else:
        typer.echo(f"bundle {summary['bundle_id']} v{summary['version']} -> {summary['path']}")


@bundle_app.command("verify")
@cli_errors
def bundle_verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder or .tar.")],
    key: Annotated[Path, typer.Option(help="Key folder or public key file.")],
    min_counter: Annotated[int | None, typer.Option(help="Reject counters below this.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each check as JSON.")] = False,
) -> None:
    """Check signature, hashes, expiry and anti-rollback counter; exit 1 naming the failed check."""
    from trainer.bundle_build import verify_model_bundle

    report = verify_model_bundle(bundle, key, min_counter)
    if as_json:
        emit_json(report)
    else:
        labels = {"ok": "ok     ", "failed": "FAIL   ", "skipped": "SKIPPED"}
        for name, check in report["checks"].items():
            typer.echo(f"{labels[check['status']]} {name}: {check['message']}")
    if not report["ok"]:
        raise typer.Exit(1)


@bundle_app.command("inspect")
@cli_errors
def bundle_inspect(bundle: Annotated[Path, typer.Argument(help="Bundle folder or .tar.")]) -> None:
    """Print the manifest summary (no verification)."""
    from edge.bundle import inspect_bundle

    emit_json(inspect_bundle(bundle))


@app.command()
@cli_errors
def demo(
    out: Annotated[Path, typer.Option(help="Working folder for data, models, reports and bundles.")] = Path(
        "runs/demo"
    ),
    seed: Annotated[int, typer.Option(help="Seed for everything.")] = 0,
    size: Annotated[
        int | None, typer.Option(help="Generated image size in pixels (default 400, --quick 224).")
    ] = None,
    quick: Annotated[bool, typer.Option(help="Small data (1-2 minutes), the same stages.")] = False,
    keep_running: Annotated[
        bool, typer.Option(help="Leave the fleet and dashboard up afterwards (Ctrl-C stops it).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """The whole fleet locally: scans -> train -> eval -> signed bundles -> collector, registry and 3
    stations -> canary rollout -> stream the test scans -> fleet stats vs offline evaluation."""
    from trainer.demo import DemoError, run_demo

    try:
        summary = run_demo(out, seed, size, quick, keep_running)
    except DemoError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        emit_json(summary)


if __name__ == "__main__":
    app()
