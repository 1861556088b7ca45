"""The demo's fleet: collector + registry + stations as real processes with CURVE, a rollout, a stream.

Story (what a plant would do): every station is commissioned with its class's bundle v1.0.0 and runs on
warm-up traffic (the class's validation normals, looping); the central team publishes v1.1.0 (the same
model with int8-compressed banks, 4x smaller) and rolls it out canary-first per class, gated on install,
golden self-test, NOK rate and score shift; then each station restarts on the part feed (the test scans)
and scores it once: a restarted station keeps the bundle the rollout activated. Every child writes
`logs/<name>.log`; nothing outlives the demo unless it is asked to keep running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.mvtec3d import list_samples
from trainer.demo_feeds import FeedPlan, build_feeds
from trainer.fleet_procs import ChildExitedError, ManagedProcess, ProcessGroup, free_port, m3dm_argv

__all__ = ["FleetEndpoints", "FleetPaths", "bring_up", "collect_results", "roll_out", "stream_parts"]

_CHILD_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class FleetPaths:
    root: Path
    keys: Path
    db_url: str  # the collector's defect log
    registry_db_url: str  # fleet, rollouts, audit: its own SQLite file, so CLI writes never wait on ingest
    store: Path
    logs: Path

    @classmethod
    def under(cls, root: Path) -> FleetPaths:
        return cls(
            root,
            root / "keys",
            f"sqlite:///{root / 'fleet.db'}",
            f"sqlite:///{root / 'registry.db'}",
            root / "registry-store",
            root / "logs",
        )


@dataclass(frozen=True)
class FleetEndpoints:
    collector: str
    registry: str
    dashboard_url: str


def _cli(*args: str, timeout_s: float = 120.0) -> str:
    """Run an `m3dm` command to completion; a failure raises with its stderr."""
    done = subprocess.run(
        m3dm_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **_CHILD_ENV},
        check=False,
    )
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip())[-800:]
        raise RuntimeError(f"m3dm {' '.join(args[:2])} failed (exit {done.returncode}): {said}")
    return done.stdout


def make_keys(paths: FleetPaths, station_ids: list[str]) -> None:
    """One CURVE keypair per process; stations' public keys go into the servers' allow folder."""
    from protocol.curve import generate_keypair

    shutil.rmtree(paths.keys, ignore_errors=True)
    allow = paths.keys / "allow"
    allow.mkdir(parents=True)
    for name in ("collector", "registry", *station_ids):
        public, _ = generate_keypair(paths.keys / name, name)
        if name in station_ids:
            shutil.copy(public, allow / f"{name}.key")


def _wait_file(group: ProcessGroup, child: ManagedProcess, path: Path, timeout_s: float) -> dict[str, Any]:
    group.wait_until(child, path.exists, timeout_s, f"wrote no {path.name}")
    return json.loads(path.read_text())


def bring_up(group: ProcessGroup, paths: FleetPaths, signing_keys: Path, bundles_dir: Path) -> FleetEndpoints:
    """Start the collector (with its dashboard) and the registry; both share the fleet database."""
    http_port = free_port()
    ready = paths.root / "collector.ready"
    ready.unlink(missing_ok=True)
    collector = group.start(
        "collector",
        m3dm_argv(
            "collector", "serve",
            "--bind", "tcp://127.0.0.1:0",
            "--db", paths.db_url,
            "--http", f"127.0.0.1:{http_port}",
            "--curve-dir", str(paths.keys / "collector"),
            "--allow", str(paths.keys / "allow"),
            "--bundles", str(bundles_dir),
            "--ready-file", str(ready),
        ),
        env=_CHILD_ENV,
    )  # fmt: skip
    collector_ep = _wait_file(group, collector, ready, 90)["zmq"]
    registry_ep = f"tcp://127.0.0.1:{free_port()}"
    ready = paths.root / "registry.ready"
    ready.unlink(missing_ok=True)
    registry = group.start(
        "registry",
        m3dm_argv(
            "deploy", "serve",
            "--store", str(paths.store),
            "--bind", registry_ep,
            "--db", paths.registry_db_url,
            "--collector-db", paths.db_url,
            "--curve-dir", str(paths.keys / "registry"),
            "--allow", str(paths.keys / "allow"),
            "--signing-key", str(signing_keys),
            "--checkin-s", "0.5",
            "--tick-s", "0.2",
            "--ready-file", str(ready),
        ),
        env=_CHILD_ENV,
    )  # fmt: skip
    _wait_file(group, registry, ready, 90)
    return FleetEndpoints(collector_ep, registry_ep, f"http://127.0.0.1:{http_port}/")


def write_station_toml(
    paths: FleetPaths,
    station_id: str,
    class_name: str,
    bundle: Path,
    signing_keys: Path,
    ends: FleetEndpoints,
) -> Path:
    """The station's own config file, as an operator would write it (deploy/config/station.toml)."""
    folder = paths.root / "stations" / station_id
    folder.mkdir(parents=True, exist_ok=True)
    keys = paths.keys
    config = folder / "station.toml"
    config.write_text(
        f"""# written by m3dm demo
station_id = "{station_id}"
bundle = "{bundle}"
key = "{signing_keys}"
backend = "ort"
source = "folder:{paths.root / "warmup" / station_id}?loop=1&fps=2"
collector = "{ends.collector}"
curve_dir = "{keys / station_id}"
collector_key = "{keys / "collector" / "collector.key"}"
outbox = "{folder / "outbox.sqlite"}"
sinks = []
backpressure = "block"
map_every_n_ok = 5
thumbnail_px = 128

[updater]
registry = "{ends.registry}"
registry_key = "{keys / "registry" / "registry.key"}"
state_dir = "{folder / "updater"}"
tags = ["class={class_name}"]
checkin_s = 0.5
backend = "ort"
"""
    )
    return config


def build_warmup_feeds(data_root: Path, root: Path, stations: dict[str, str]) -> None:
    """Per station, its class's validation normals as `warmup/<stem>` frames (looped before the rollout)."""
    for station_id, class_name in stations.items():
        for ref in list_samples(data_root, class_name, "validation"):
            for kind, src in (("rgb", ref.rgb_path), ("xyz", ref.xyz_path)):
                if src is None:
                    continue
                link = root / "warmup" / station_id / "warmup" / kind / src.name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.unlink(missing_ok=True)
                os.symlink(src.resolve(), link)


def start_stations(group: ProcessGroup, configs: dict[str, Path], *extra: str) -> dict[str, ManagedProcess]:
    return {
        sid: group.start(sid, m3dm_argv("edge", "run", "--config", str(cfg), *extra), env=_CHILD_ENV)
        for sid, cfg in configs.items()
    }


def wait_for_baseline(
    group: ProcessGroup, paths: FleetPaths, station_ids: list[str], per_station: int
) -> None:
    """Hold the rollout until every station has results under its current bundle: the health gate compares
    the new bundle's NOK rate and scores with the previous bundle's on the same stations."""
    import sqlalchemy as sa

    from collector.db import make_engine
    from collector.schema import inspections as t

    engine = make_engine(paths.db_url)
    query = sa.select(t.c.station_id, sa.func.count()).group_by(t.c.station_id)

    def enough() -> bool:
        with engine.connect() as conn:
            counts = dict(conn.execute(query).all())
        return all(counts.get(sid, 0) >= per_station for sid in station_ids)

    deadline = time.monotonic() + 300
    try:
        while not enough():
            group.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"stations sent fewer than {per_station} results each within 300 s")
            time.sleep(0.5)
    finally:
        engine.dispose()


def roll_out(
    paths: FleetPaths, tar: Path, signing_keys: Path, class_name: str, quick: bool
) -> dict[str, Any]:
    """Publish a bundle and roll it out to the class's stations, canary first; returns the final status.

    Bounds are loose on purpose: int8 banks move kNN distances a little, systematically, and the demo's
    warm-up traffic is a handful of looping validation normals, whose score IQR is tiny and whose scores sit
    close to a threshold read from those same few normals. Seen between runs: median shifts of 0.001-1.0
    IQRs and single normals flipping to NOK. A plant sets these from its own traffic; the gate itself is
    tested with planted regressions in tests/deploy/test_fleet.py.
    """
    published = json.loads(
        _cli(
            "deploy", "publish", str(tar), "--store", str(paths.store), "--db", paths.registry_db_url,
            "--key", str(signing_keys), "--actor", "m3dm-demo", "--reason", "int8 banks, 4x smaller",
            "--json",
        )
    )  # fmt: skip
    bundle_id = published["bundle_id"]
    status = json.loads(
        _cli(
            "deploy", "rollout", "--db", paths.registry_db_url, "--bundle", bundle_id,
            "--stations", f"class={class_name}", "--canary", "1", "--wave-size", "1",
            "--soak", "2s" if quick else "5s", "--min-results", "6",
            "--max-nok-rate-delta", "0.5", "--max-score-shift", "5", "--install-timeout", "120s",
            "--actor", "m3dm-demo", "--reason", f"demo rollout of {class_name} 1.1.0",
            "--wait", "--wait-timeout", "6m", "--json",
            timeout_s=420,
        )
    )  # fmt: skip
    return {"bundle_id": bundle_id, **status}


def stream_parts(
    group: ProcessGroup, running: dict[str, ManagedProcess], configs: dict[str, Path], feeds: list[FeedPlan]
) -> dict[str, int]:
    """Stop the warm-up stations, restart each on its part feed with --once, wait until all is acked."""
    for child in running.values():
        group.stop(child)
    exits = {}
    parts = {
        plan.station_id: group.start(
            f"{plan.station_id}-parts",
            m3dm_argv(
                "edge", "run", "--config", str(configs[plan.station_id]),
                "--source", f"folder:{plan.folder}", "--once",
            ),
            env=_CHILD_ENV,
        )
        for plan in feeds
    }  # fmt: skip
    for sid, child in parts.items():
        code = group.wait_exit(child, 600)
        if code != 0:
            raise ChildExitedError(child.name, f"exited with code {code}", child.log_path)
        exits[sid] = code
    return exits


def collect_results(paths: FleetPaths) -> list[dict[str, Any]]:
    """Every stored result, through the collector's own query command."""
    return json.loads(_cli("collector", "query", "--db", paths.db_url, "--limit", "1000000", "--json"))


def fleet_stats(paths: FleetPaths) -> dict[str, Any]:
    return json.loads(_cli("collector", "stats", "--db", paths.db_url, "--json"))


def wait_forever(group: ProcessGroup) -> None:
    """--keep-running: hold the fleet until Ctrl-C, failing loudly if a server dies meanwhile."""
    try:
        while True:
            group.check_alive()
            time.sleep(1.0)
    except KeyboardInterrupt:
        return


def feeds_for(data_root: Path, root: Path, stations: dict[str, str]) -> list[FeedPlan]:
    shutil.rmtree(root / "parts", ignore_errors=True)
    shutil.rmtree(root / "warmup", ignore_errors=True)
    build_warmup_feeds(data_root, root, stations)
    return build_feeds(data_root, root / "parts", stations)
