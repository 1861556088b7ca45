"""`m3dm collector`: the collector role's commands (imported only when `m3dm collector` runs).

    m3dm collector serve --bind tcp://*:5601 --db sqlite:///fleet.db --http 127.0.0.1:8600 \
        --curve-dir keys/collector --allow keys/stations [--bundles DIR] [--config collector.toml]
    m3dm collector query --db URL [--station S] [--since 1h] [--decision NOK] [--bundle V] [--limit N]
        [--json|--csv]
    m3dm collector stats --db URL [--since 1h] [--json]
    m3dm collector drift --db URL [--json]

Exit codes: 0 ok, 1 failure (database unreachable, bad config), 2 usage.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="collector role.", no_args_is_help=True, add_completion=False)

DbOpt = Annotated[
    str, typer.Option("--db", help="sqlite:///PATH or postgresql+psycopg://USER:PW@HOST:PORT/DB")
]
SinceOpt = Annotated[
    str | None, typer.Option(help="Only results newer than this: 90s, 30m, 1h, 2d or Unix seconds.")
]
_DECISIONS = ("OK", "NOK", "ERROR")
_CSV_SKIP = ("bank_scores", "latency_ms", "labels")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _since(text: str | None) -> float | None:
    from collector.timespec import parse_since

    if text is None:
        return None
    try:
        return parse_since(text)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--since") from None


def _open_store(url: str) -> Any:
    import sqlalchemy.exc

    from collector.store import Store

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as err:
        raise typer.BadParameter(str(err), param_hint="--db") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        raise _fail(f"no database at {parsed.database}")  # a query must not create an empty one
    try:
        return Store.open(url)
    except (sqlalchemy.exc.SQLAlchemyError, OSError, ValueError) as err:
        raise _fail(f"cannot open database {shown}: {str(err).splitlines()[0]}") from None


def _read(url: str, fn: Any) -> Any:
    """fn(store) on an opened store, closed afterwards (its pool holds database connections)."""
    store = _open_store(url)
    try:
        return fn(store)
    finally:
        store.close()


def _json_out(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command("serve")
def serve(
    bind: Annotated[str | None, typer.Option(help="ZeroMQ endpoint, e.g. tcp://*:5601.")] = None,
    db: Annotated[
        str | None, typer.Option(help="Database URL (sqlite:///fleet.db, postgresql+psycopg://...).")
    ] = None,
    http: Annotated[
        str | None, typer.Option(help="HOST:PORT for /metrics, API, dashboard; '' disables.")
    ] = None,
    curve_dir: Annotated[Path | None, typer.Option(help="Folder with the collector's keypair.")] = None,
    allow: Annotated[Path | None, typer.Option(help="Folder of allowed station public keys (*.key).")] = None,
    bundles: Annotated[
        Path | None, typer.Option(help="Folder of bundles (drift reference quantiles).")
    ] = None,
    ready_file: Annotated[Path | None, typer.Option(help="Write the bound endpoints here (JSON).")] = None,
    config: Annotated[Path | None, typer.Option(help="collector.toml; flags override it.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Ingest results from the stations (CURVE ROUTER) into the database; serve metrics, API, dashboard."""
    from collector.config import CollectorConfig
    from protocol.config import ConfigFileError, load_config

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    overrides = dict(bind=bind, db=db, http=http, curve_dir=curve_dir, allow=allow, bundles=bundles)
    overrides["ready_file"] = ready_file
    try:
        cfg = load_config(CollectorConfig, config, overrides)
    except ConfigFileError as err:
        raise _fail(str(err)) from None
    _run_service(cfg)


def _run_service(cfg: Any) -> None:
    import sqlalchemy.exc
    import zmq

    from collector.service import CollectorService

    try:
        service = CollectorService(cfg)
    except (ValueError, OSError, sqlalchemy.exc.SQLAlchemyError) as err:
        raise _fail(str(err).splitlines()[0]) from None
    try:
        service.run_forever()
    except (zmq.ZMQError, OSError) as err:
        raise _fail(f"cannot serve on {cfg.bind} / {cfg.http}: {err}") from None


@app.command("query")
def query(
    db: DbOpt,
    station: Annotated[str | None, typer.Option(help="Only this station.")] = None,
    since: SinceOpt = None,
    decision: Annotated[str | None, typer.Option(help="OK, NOK or ERROR.")] = None,
    bundle: Annotated[str | None, typer.Option(help="Bundle version (or bundle id).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows, newest first.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list (the default).")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV (JSON columns left out).")] = False,
) -> None:
    """Stored results, newest first: station_id, epoch, seq, frame_id, decision, image_score, bank_scores,
    bundle_version, ..., error_reason, error_file (every field of the result message)."""
    if as_json and as_csv:
        raise typer.BadParameter("give --json or --csv, not both")
    if decision is not None and decision.upper() not in _DECISIONS:
        raise typer.BadParameter(f"must be one of {', '.join(_DECISIONS)}", param_hint="--decision")
    since_ts = _since(since)  # usage errors before touching the database
    rows = _read(db, lambda store: store.query(station, since_ts, decision, bundle, limit))
    if not as_csv:
        _json_out(rows)
        return
    columns = [c for c in (rows[0].keys() if rows else []) if c not in _CSV_SKIP]
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


@app.command("stats")
def stats(
    db: DbOpt,
    since: SinceOpt = None,
    station: Annotated[str | None, typer.Option(help="Only this station.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Per station and per bundle: count, NOK rate, image-score percentiles, p95 end-to-end latency."""
    since_ts = _since(since)
    data = _read(db, lambda store: store.stats(since_ts, station))
    if as_json:
        _json_out(data)
        return
    for group, key in (("stations", "station_id"), ("bundles", "bundle_version")):
        typer.echo(f"{group}:")
        typer.echo(
            f"  {key:<24} {'count':>8} {'nok_rate':>8} {'p50':>9} {'p90':>9} {'p99':>9} {'lat_p95_ms':>10}"
        )
        for e in data[group]:
            p = [
                f"{e[k]:9.4f}" if e[k] is not None else f"{'-':>9}"
                for k in ("score_p50", "score_p90", "score_p99")
            ]
            lat = f"{e['latency_p95_ms']:10.1f}" if e["latency_p95_ms"] is not None else f"{'-':>10}"
            typer.echo(f"  {e[key]:<24} {e['count']:>8} {e['nok_rate']:>8.3f} {' '.join(p)} {lat}")


@app.command("drift")
def drift(
    db: DbOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Drift state per station and bundle variant (ok / alarm / unknown), PSI and KS, as last evaluated."""
    states = _read(db, lambda store: store.drift_states())
    if as_json:
        _json_out(states)
        return
    for s in states:
        psi = "-" if s["psi"] is None else f"{s['psi']:.3f}"
        ks = "-" if s["ks"] is None else f"{s['ks']:.3f}"
        typer.echo(
            f"{s['station_id']:<24} {s['bundle_version']:<12} {s['state']:<8} "
            f"psi {psi:>6} ks {ks:>6} n {s['n']}"
        )
