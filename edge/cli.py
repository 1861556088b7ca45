"""`m3dm edge`: the edge role's commands (imported only when `m3dm edge` runs; never imports trainer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="edge role: the station.", no_args_is_help=True, add_completion=False)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from core.errors import M3DMError
    from edge.outbox import OutboxBusyError
    from protocol.errors import BundleError

    return (M3DMError, BundleError, OutboxBusyError, OSError, ValueError)


@app.command("run")
def run(  # noqa: PLR0913 - one flag per setting, as documented in the issue
    bundle: Annotated[Path | None, typer.Option(help="Signed bundle folder or .tar.")] = None,
    key: Annotated[
        Path | None, typer.Option(help="Bundle signing public key (file or folder); required.")
    ] = None,
    insecure_no_verify: Annotated[
        bool,
        typer.Option(
            "--insecure-no-verify",
            help="Score the bundle WITHOUT checking its signature (lab only; logged loudly). "
            "Without it, a missing --key is an error (exit 2).",
        ),
    ] = False,
    station_id: Annotated[str | None, typer.Option(help="This station's id.")] = None,
    source: Annotated[
        str | None, typer.Option(help="folder:PATH[?loop=1&fps=N], synth:CLASS[?...], rgbd:PATH, plug-ins.")
    ] = None,
    collector: Annotated[
        str | None, typer.Option(help="tcp://HOST:PORT; without it results are not stored or sent.")
    ] = None,
    once: Annotated[
        bool, typer.Option(help="Stop when a finite source ends and every result is acked.")
    ] = False,
    max_fps: Annotated[float | None, typer.Option(help="Cap on frames per second (0 = none).")] = None,
    backend: Annotated[str | None, typer.Option(help="auto | ort | trt")] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32: run an int8 bundle's fp32 graphs (default: the bundle's own).")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus /metrics on this port.")] = None,
    outbox: Annotated[Path | None, typer.Option(help="SQLite outbox file.")] = None,
    curve_dir: Annotated[Path | None, typer.Option(help="This station's CURVE keypair folder.")] = None,
    collector_key: Annotated[Path | None, typer.Option(help="Collector public key file or folder.")] = None,
    variant: Annotated[
        str | None, typer.Option(help="Decision variant (default: the bundle's own, e.g. rgb+point+fusion).")
    ] = None,
    sink: Annotated[
        list[str] | None,
        typer.Option(help="Decision sink URI, repeatable: stdout:, mqtt://HOST:PORT, plug-ins."),
    ] = None,
    backpressure: Annotated[str | None, typer.Option(help="drop_oldest | block")] = None,
    config: Annotated[Path | None, typer.Option(help="station.toml; flags override it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final summary as JSON.")] = False,
) -> None:
    """Score frames from a source in real time; results to the collector, decisions to the sinks."""
    from edge.memory import tune_malloc

    tune_malloc()  # before any runner or pipeline thread exists (edge/memory.py says why)
    from edge.config import StationConfig
    from edge.station import Station, configure_logging
    from protocol.config import ConfigFileError, load_config

    overrides: dict[str, Any] = {
        "bundle": bundle,
        "key": key,
        "station_id": station_id,
        "source": source,
        "collector": collector,
        "max_fps": max_fps,
        "backend": backend,
        "precision": precision,
        "metrics_port": metrics_port,
        "outbox": outbox,
        "curve_dir": curve_dir,
        "collector_key": collector_key,
        "variant": variant,
        "sinks": list(sink) if sink else None,
        "backpressure": backpressure,
        "insecure_no_verify": True if insecure_no_verify else None,  # absent flag: the config file's value
    }
    try:
        cfg = load_config(StationConfig, config, overrides)
    except (ConfigFileError, TypeError) as err:
        raise _fail(str(err), 2) from None
    except _expected_errors() as err:
        raise _fail(str(err), 2) from None
    log_filter = configure_logging(cfg.station_id, cfg.log_level)
    try:
        station = Station.open(cfg, log_filter)
    except _expected_errors() as err:
        raise _fail(f"station not started: {err}") from None
    if cfg.metrics_port is not None:
        _, port = station.metrics.serve(cfg.metrics_port, cfg.metrics_addr)
        typer.echo(f"metrics on http://{cfg.metrics_addr}:{port}/metrics", err=True)
    summary = station.run(once=once)
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    if once and not summary["delivered"]:
        raise _fail("not every result was acked by the collector (they stay in the outbox)")


@app.command("score")
def score(
    paths: Annotated[
        list[Path], typer.Argument(help="Scan folders, or rgb/xyz files of MVTec-layout pairs.")
    ],
    bundle: Annotated[Path, typer.Option(help="Signed bundle folder or .tar.")],
    key: Annotated[
        Path | None, typer.Option(help="Bundle signing public key (file or folder); required.")
    ] = None,
    insecure_no_verify: Annotated[
        bool,
        typer.Option(
            "--insecure-no-verify", help="Score WITHOUT checking the bundle's signature (lab only)."
        ),
    ] = False,
    variant: Annotated[str | None, typer.Option(help="Decision variant (default: the bundle's own).")] = None,
    backend: Annotated[str, typer.Option(help="auto | ort | trt")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of results.")] = False,
) -> None:
    """Score scans once through the station pipeline and print the results (ops and tests)."""
    import logging

    from edge.score_files import score_paths

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if key is None and not insecure_no_verify:
        # the same rule as `edge run`: a score from an unverified bundle is not a station's score
        raise _fail(
            "no bundle signing key: pass --key PUB (or, on a lab bench only, --insecure-no-verify)", 2
        )
    if key is None:
        logging.getLogger("m3dm.edge").error("INSECURE: scoring %s WITHOUT signature verification", bundle)
    try:
        results = score_paths(paths, bundle, key, variant, backend)
    except _expected_errors() as err:
        raise _fail(str(err)) from None
    if as_json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
        return
    for r in results:
        score_txt = "-" if r["image_score"] is None else f"{r['image_score']:.6f}"
        extra = f"  {r['error_reason']} ({r['error_file']})" if r["decision"] == "ERROR" else ""
        typer.echo(f"{r['frame_id']}  {r['decision']:5s}  {score_txt}{extra}")


# --- deploy: operator hold on updates (edge/update_lock.py) ---------------------------------------------

StateDirOpt = Annotated[
    Path, typer.Option("--state-dir", help="The updater's state folder ([updater] state_dir).")
]


@app.command("lock")
def lock_updates(
    state_dir: StateDirOpt,
    reason: Annotated[str, typer.Option(help="Why (shown in the registry's audit log).")] = "",
) -> None:
    """Hold bundle updates (a production lot is running): offers are fetched and verified, not applied."""
    from edge.update_lock import LockHeldError, lock

    try:
        info = lock(state_dir, reason)
    except (LockHeldError, OSError) as err:
        raise _fail(str(err)) from None
    typer.echo(f"updates locked by {info['by']}")


@app.command("unlock")
def unlock_updates(state_dir: StateDirOpt) -> None:
    """Release the hold; a deferred update is applied at the next check-in."""
    from edge.update_lock import unlock

    try:
        held = unlock(state_dir)
    except OSError as err:
        raise _fail(str(err)) from None
    typer.echo("updates unlocked" if held else "updates were not locked")
