"""`m3dm deploy`: the registry service and its operator commands (imported only when `m3dm deploy` runs).

Every command works on the registry database (`--db`, or `db` in `--config registry.toml`); only `serve`
opens sockets. Operator commands write desired state and the audit log; the running registry picks the
change up at its next tick or station check-in, so they work while it runs (and while it is down).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    help="Registry and rollouts of bundles to the fleet.", no_args_is_help=True, add_completion=False
)

F = TypeVar("F", bound=Callable[..., object])
log = logging.getLogger("m3dm.deploy")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="registry.toml (flags override it).")]
DbOpt = Annotated[
    str | None, typer.Option("--db", help="Registry database URL (sqlite:///PATH, postgresql+psycopg://...).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ActorOpt = Annotated[
    str | None, typer.Option("--actor", help="Who does this (audit log); default user@host.")
]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (audit log).")]


class CliError(Exception):
    """An expected failure: one line on stderr, exit 1."""


def cli_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        import sqlalchemy as sa

        from deploy.bundle_store import PublishError
        from deploy.rollout import RolloutError
        from deploy.selector import SelectorError
        from protocol.config import ConfigFileError

        # operator commands print their result; only warnings go to the log (serve logs every event)
        level = logging.INFO if func.__name__ == "serve" else logging.WARNING
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            return func(*args, **kwargs)
        except (
            CliError,
            PublishError,
            RolloutError,
            SelectorError,
            ConfigFileError,
            ValueError,
            KeyError,
        ) as err:
            typer.echo(f"error: {err}".replace("\n", " "), err=True)
            raise typer.Exit(1) from None
        except (sa.exc.SQLAlchemyError, OSError) as err:
            typer.echo(f"error: {type(err).__name__}: {str(err).splitlines()[0]}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _config(path: Path | None, **overrides: Any) -> Any:
    from deploy.config import RegistryConfig
    from protocol.config import load_config

    return load_config(RegistryConfig, path, overrides)


def _engine(config: Path | None, db: str | None) -> Any:
    from deploy.db import open_db

    return open_db(_config(config, db=db).db)


def _actor(actor: str | None) -> str:
    from deploy.audit import default_actor

    return actor or default_actor()


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """'60s', '30m', '1.5h', '500ms', '2' (seconds) -> seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration like 60s, 30m, 1h, 500ms")
    scale = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * scale


def _resolve_bundle(engine: Any, prefix: str) -> str:
    import sqlalchemy as sa

    from deploy.tables import bundles

    with engine.connect() as conn:
        ids = [
            r.bundle_id
            for r in conn.execute(
                sa.select(bundles.c.bundle_id).where(bundles.c.bundle_id.startswith(prefix))
            )
        ]
    if len(ids) != 1:
        raise CliError(
            f"bundle {prefix!r} matches {len(ids)} published bundles" + (f": {ids}" if ids else "")
        )
    return ids[0]


def _print(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    else:
        sys.stdout.write(text(data) + "\n")


# ---------------------------------------------------------------------------------------------- serve


@app.command()
@cli_errors
def serve(
    config: ConfigOpt = None,
    store: Annotated[Path | None, typer.Option(help="Bundle store folder.")] = None,
    bind: Annotated[str | None, typer.Option(help="ROUTER endpoint, e.g. tcp://*:5560.")] = None,
    db: DbOpt = None,
    curve_dir: Annotated[Path | None, typer.Option(help="The registry's CURVE keypair folder.")] = None,
    allow: Annotated[Path | None, typer.Option(help="Folder of allowed station public keys.")] = None,
    signing_key: Annotated[Path | None, typer.Option(help="Trusted bundle signing public key.")] = None,
    collector_db: Annotated[str | None, typer.Option(help="Collector database URL (default: --db).")] = None,
    checkin_s: Annotated[float | None, typer.Option(help="Station check-in interval asked for (s).")] = None,
    tick_s: Annotated[float | None, typer.Option(help="Rollout engine step interval (s).")] = None,
    ready_file: Annotated[Path | None, typer.Option(help="Write the bound endpoint here (JSON).")] = None,
) -> None:
    """Run the registry: station check-ins, bundle chunks, update reports, rollouts (until SIGTERM)."""
    from deploy.registry import run_until_signal

    cfg = _config(
        config,
        store=store,
        bind=bind,
        db=db,
        curve_dir=curve_dir,
        allow_dir=allow,
        signing_key=signing_key,
        collector_db=collector_db,
        checkin_s=checkin_s,
        tick_s=tick_s,
        ready_file=ready_file,
    )
    run_until_signal(cfg)


# -------------------------------------------------------------------------------------------- publish


@app.command()
@cli_errors
def publish(
    bundle: Annotated[Path, typer.Argument(help="Bundle tar (m3dm bundle build writes <dir>.tar).")],
    config: ConfigOpt = None,
    store: Annotated[Path | None, typer.Option(help="Bundle store folder.")] = None,
    db: DbOpt = None,
    key: Annotated[Path | None, typer.Option(help="Trusted signing public key (or its folder).")] = None,
    actor: ActorOpt = None,
    reason: ReasonOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Verify a bundle's signature with the trusted key and add it to the store."""
    from deploy.bundle_store import publish as do_publish
    from deploy.db import open_db

    cfg = _config(config, store=store, db=db, signing_key=key)
    row = do_publish(open_db(cfg.db), bundle, cfg.store, cfg.signing_key, _actor(actor), reason)
    out = {
        k: row[k]
        for k in ("bundle_id", "version", "class_name", "anti_rollback_counter", "size_bytes", "sha256")
    }
    _print(
        out,
        as_json,
        lambda d: f"published {d['bundle_id']} v{d['version']} ({d['class_name']}, {d['size_bytes']} bytes)",
    )


# -------------------------------------------------------------------------------------------- rollout


@app.command()
@cli_errors
def rollout(
    bundle: Annotated[str, typer.Option("--bundle", help="Bundle id (or a unique prefix).")],
    stations: Annotated[
        str,
        typer.Option("--stations", help="Selector: all | KEY=VALUE | tag:NAME | ID glob, comma-separated."),
    ],
    canary: Annotated[int, typer.Option(help="Stations in the first wave.")] = 1,
    wave_size: Annotated[int, typer.Option(help="Stations per later wave.")] = 1,
    soak: Annotated[str, typer.Option(help="Soak after each wave: 60s, 30m, 1h.")] = "60s",
    max_nok_rate_delta: Annotated[
        float, typer.Option(help="Allowed |NOK rate(new) - NOK rate(old)|.")
    ] = 0.05,
    max_score_shift: Annotated[
        float, typer.Option(help="Allowed median score shift, in IQRs of the old bundle.")
    ] = 1.0,
    min_results: Annotated[int, typer.Option(help="Results per station needed to judge health.")] = 5,
    install_timeout: Annotated[
        str, typer.Option(help="Give up on a station that has not installed by then.")
    ] = "5m",
    require_shadow: Annotated[
        bool, typer.Option("--require-shadow", help="Pass a shadow period on the canary first.")
    ] = False,
    shadow_period: Annotated[str, typer.Option(help="Length of that shadow period.")] = "60s",
    shadow_every: Annotated[int, typer.Option(help="Shadow-score 1 in N frames.")] = 1,
    max_flip_rate: Annotated[
        float, typer.Option(help="Allowed share of flipped decisions in the shadow period.")
    ] = 0.05,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the rollout until it ends (exit 1 unless done).")
    ] = False,
    wait_timeout: Annotated[str, typer.Option(help="Give up waiting after this long.")] = "1h",
    config: ConfigOpt = None,
    db: DbOpt = None,
    actor: ActorOpt = None,
    reason: ReasonOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Start a staged rollout: canary first, soak, then wave by wave while health holds; else roll back."""
    from deploy.rollout import RolloutSpec, create_rollout

    durations = parse_duration(soak), parse_duration(install_timeout), parse_duration(shadow_period)
    wait_s = parse_duration(wait_timeout)
    engine = _engine(config, db)
    spec = RolloutSpec(
        bundle_id=_resolve_bundle(engine, bundle),
        selector=stations,
        canary=canary,
        wave_size=wave_size,
        soak_s=durations[0],
        max_nok_rate_delta=max_nok_rate_delta,
        max_score_shift=max_score_shift,
        min_results=min_results,
        install_timeout_s=durations[1],
        require_shadow=require_shadow,
        shadow_s=durations[2],
        shadow_every_n=shadow_every,
        max_flip_rate=max_flip_rate,
    )
    rollout_id = create_rollout(engine, spec, _actor(actor), reason)
    if not wait:
        _print({"rollout_id": rollout_id}, as_json, lambda d: f"rollout {d['rollout_id']} started")
        return
    final = _wait_rollout(engine, rollout_id, wait_s)
    _print(final, as_json, _rollout_text)
    if final["state"] != "done":
        raise typer.Exit(1)


def _wait_rollout(engine: Any, rollout_id: str, timeout_s: float) -> dict[str, Any]:
    from deploy.rollout import ACTIVE_STATES, rollout_status

    deadline = time.monotonic() + timeout_s
    while True:
        with engine.connect() as conn:
            status = rollout_status(conn, rollout_id)[0]
        if status["state"] not in ACTIVE_STATES or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _rollout_text(r: dict[str, Any]) -> str:
    lines = [
        f"rollout {r['rollout_id'][:12]} bundle {r['bundle_id'][:12]} [{r['selector']}] state={r['state']}"
        f" wave={r['wave']}" + (f" reason: {r['reason']}" if r["reason"] else "")
    ]
    for s in r["stations"]:
        lines.append(f"  wave {s['wave']} {s['station_id']:<20} {s['state']:<13} {s['reason']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- status


@app.command()
@cli_errors
def status(
    rollout_id: Annotated[
        str | None, typer.Option("--rollout", help="Only this rollout (id prefix).")
    ] = None,
    config: ConfigOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The fleet (bundle, previous, health, last check-in) and each station's state in every rollout."""
    from deploy.fleet import list_stations
    from deploy.rollout import rollout_status

    engine = _engine(config, db)
    with engine.connect() as conn:
        data = {"stations": list_stations(conn), "rollouts": rollout_status(conn, rollout_id)}

    def text(d: dict[str, Any]) -> str:
        now = time.time()
        lines = ["station               bundle     version   previous   policy  locked  fps    last check-in"]
        for s in d["stations"]:
            ago = f"{now - s['last_checkin_ts']:.0f}s ago" if s["last_checkin_ts"] else "never"
            lines.append(
                f"{s['station_id']:<21} {s['active_bundle_id'][:8]:<10} {s['active_version']:<9} "
                f"{s['previous_bundle_id'][:8]:<10} v{s['policy_version']:<6} "
                f"{'yes' if s['locked'] else 'no':<7} {s['health'].get('fps', 0.0):<6.2f} {ago}"
            )
        lines += [_rollout_text(r) for r in d["rollouts"]]
        return "\n".join(lines)

    _print(data, as_json, text)


# ------------------------------------------------------------------------------------------- rollback


@app.command()
@cli_errors
def rollback(
    stations: Annotated[str, typer.Option("--stations", help="Selector of the stations to roll back.")],
    config: ConfigOpt = None,
    db: DbOpt = None,
    actor: ActorOpt = None,
    reason: ReasonOpt = "manual rollback",
    as_json: JsonOpt = False,
) -> None:
    """Send stations back to their previous bundle (aborting any rollout they are in)."""
    from deploy.rollout import manual_rollback

    out = manual_rollback(_engine(config, db), stations, _actor(actor), reason)
    if not out:
        raise CliError(f"selector {stations!r} matches no known station")
    _print(
        out, as_json, lambda d: "\n".join(f"{x['station_id']}: {x['note']} {x['bundle_id'][:12]}" for x in d)
    )


# -------------------------------------------------------------------------------------- set-threshold


@app.command("set-threshold")
@cli_errors
def set_threshold(
    stations: Annotated[
        str, typer.Option("--stations", help="Selector of the stations (also later ones that match).")
    ],
    variant: Annotated[str | None, typer.Option(help="Decision variant, e.g. rgb+point+fusion.")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Image-score threshold; omit to return to the bundle's.")
    ] = None,
    map_every_n_ok: Annotated[
        int | None, typer.Option(help="Attach the map to 1 in N OK results (0 = never).")
    ] = None,
    config: ConfigOpt = None,
    db: DbOpt = None,
    actor: ActorOpt = None,
    reason: ReasonOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """A new versioned runtime policy; every result decided by it carries its version (threshold_version)."""
    from deploy.fleet import set_policy

    if map_every_n_ok is not None and map_every_n_ok < 0:
        raise CliError("--map-every-n-ok must be >= 0")
    version = set_policy(
        _engine(config, db), stations, _actor(actor), variant, threshold, map_every_n_ok, reason
    )
    _print({"policy_version": version}, as_json, lambda d: f"policy v{d['policy_version']} recorded")


# --------------------------------------------------------------------------------------------- shadow


@app.command()
@cli_errors
def shadow(
    stations: Annotated[str, typer.Option("--stations", help="Selector of the stations.")],
    bundle: Annotated[str | None, typer.Option("--bundle", help="Candidate bundle id (or prefix).")] = None,
    every: Annotated[int, typer.Option(help="Shadow-score 1 in N frames.")] = 1,
    stop: Annotated[bool, typer.Option("--stop", help="Stop shadow scoring on these stations.")] = False,
    config: ConfigOpt = None,
    db: DbOpt = None,
    actor: ActorOpt = None,
    reason: ReasonOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Run a candidate bundle beside the active one (results flagged shadow), or --stop it."""
    from deploy.db import writer
    from deploy.fleet import clear_shadow, select_stations, set_shadow

    engine = _engine(config, db)
    if stop:
        with writer(engine).begin() as conn:
            ids = select_stations(conn, stations)
            clear_shadow(conn, ids, _actor(actor), reason)
    else:
        if bundle is None or every < 1:
            raise CliError("--bundle is required (and --every >= 1) unless --stop")
        ids = set_shadow(engine, stations, _resolve_bundle(engine, bundle), every, _actor(actor), reason)
    _print(
        {"stations": ids, "stopped": stop},
        as_json,
        lambda d: f"shadow {'stopped' if stop else 'set'} on {d['stations']}",
    )


# -------------------------------------------------------------------------------------------- compare


@app.command()
@cli_errors
def compare(
    active: Annotated[str, typer.Option("--active", help="Bundle id of the live results.")],
    candidate: Annotated[str, typer.Option("--candidate", help="Bundle id of the shadow results.")],
    stations: Annotated[
        str | None, typer.Option("--stations", help="Only these station ids (comma-separated).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Only results of the last DURATION (e.g. 1h).")] = None,
    collector_db: Annotated[str | None, typer.Option(help="Collector database URL (default: --db).")] = None,
    config: ConfigOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Decision flips, score correlation and NOK-rate delta of a shadow candidate vs the active bundle."""
    from deploy.db import make_engine
    from deploy.health import compare_shadow

    cfg = _config(config, db=db, collector_db=collector_db)
    engine = make_engine(cfg.collector_db or cfg.db)
    ids = [s.strip() for s in stations.split(",") if s.strip()] if stations else None
    since_ts = time.time() - parse_duration(since) if since else None
    result = compare_shadow(engine, active, candidate, ids, since_ts).to_dict()

    def text(d: dict[str, Any]) -> str:
        return (
            f"{d['n_pairs']} frames scored by both; {d['flips']} decisions flip "
            f"({d['flips_ok_to_nok']} OK->NOK, {d['flips_nok_to_ok']} NOK->OK, rate {d['flip_rate']:.3f}); "
            f"score correlation {d['score_correlation']:.4f}; NOK rate {d['nok_rate_active']:.3f} -> "
            f"{d['nok_rate_candidate']:.3f} (delta {d['nok_rate_delta']:+.3f})"
        )

    _print(result, as_json, text)
    if result["n_pairs"] == 0:
        raise CliError(f"no shadow results of {candidate} paired with live results of {active}")


# ---------------------------------------------------------------------------------------------- audit


@app.command()
@cli_errors
def audit(
    limit: Annotated[int, typer.Option(help="Newest N entries.")] = 50,
    target: Annotated[str | None, typer.Option(help="Only entries whose target contains this.")] = None,
    config: ConfigOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The audit log: who did what, to what, when and why."""
    from deploy.audit import read_audit

    with _engine(config, db).connect() as conn:
        rows = read_audit(conn, limit, target)

    def text(d: list[dict[str, Any]]) -> str:
        return "\n".join(
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(r['ts']))}Z {r['actor']:<24} {r['action']:<16} "
            f"{r['target']:<44} {r['reason']}"
            for r in d
        )

    _print(rows, as_json, text)
