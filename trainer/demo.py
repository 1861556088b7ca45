"""`m3dm demo`: the whole fleet on one machine, on an embedded default: no weights, no downloads.

Stages (each named in the log; a failure stops the demo, naming the stage and the log to read):
  1 data      generate 2 classes of structured-light scans (MVTec 3D-AD layout)
  2 train     fit the weight-free preset per class
  3 eval      five-variant tables per class (I-AUROC, P-AUROC, AUPRO)
  4 bundles   export and sign v1.0.0 (fp32 banks) and v1.1.0 (int8 banks) per class
  5 fleet     CURVE keys; collector (SQLite + dashboard), registry and 3 stations as processes
  6 rollout   v1.1.0 canary-first per class, gated on install, golden replay, NOK rate, score shift
  7 stream    every station scores its share of the test scans once, through the collector
  8 summary   counts, NOK rate and latency per station from the collector, and agreement of every
              stored decision with the offline scoring of the same scan through the same bundle
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

log = logging.getLogger("m3dm.demo")
# A log file or CI is not a terminal: rich would wrap tables at 80 columns and cut every cell.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)

__all__ = ["DemoError", "DemoPlan", "run_demo"]


class DemoError(RuntimeError):
    """A stage failed; `stage` names it and `log_path` is where to look."""

    def __init__(self, stage: str, message: str, log_path: Path | None) -> None:
        self.stage = stage
        self.log_path = log_path
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"demo stage '{stage}' failed: {message}{where}")


@dataclass(frozen=True)
class DemoPlan:
    """What the demo generates and which station inspects which class."""

    classes: tuple[str, ...]
    stations: dict[str, str]  # station id -> class; two stations on the first class show canary + wave
    size_px: int
    n_train: int
    n_validation: int
    n_test_good: int
    n_test_per_defect: int

    @classmethod
    def default(cls, quick: bool, size_px: int | None = None) -> DemoPlan:
        classes = ("ring", "gland")
        stations = {"station-1": "ring", "station-2": "ring", "station-3": "gland"}
        if quick:
            return cls(classes, stations, size_px or 224, 8, 4, 3, 1)
        return cls(classes, stations, size_px or 400, 40, 8, 10, 5)


@contextmanager
def stage(name: str, timings: dict[str, float], log_path: Path | None = None) -> Iterator[None]:
    from trainer.fleet_procs import ChildExitedError

    console.rule(f"[bold]{name}")
    t0 = time.perf_counter()
    try:
        yield
    except ChildExitedError as err:
        raise DemoError(name, str(err), err.log_path) from err
    except DemoError:
        raise
    except Exception as err:
        raise DemoError(name, f"{type(err).__name__}: {err}", log_path) from err
    timings[f"{name}_s"] = round(time.perf_counter() - t0, 1)
    log.info("stage %s done in %.1f s", name, timings[f"{name}_s"])


def _synth(data: Path, out: Path, plan: DemoPlan, seed: int) -> None:
    from trainer.progress import progress_callback
    from trainer.synth import SynthConfig, synthesize, write_preview

    cfg = SynthConfig(
        seed=seed,
        classes=plan.classes,
        n_train=plan.n_train,
        n_validation=plan.n_validation,
        n_test_good=plan.n_test_good,
        n_test_per_defect=plan.n_test_per_defect,
        width_px=plan.size_px,
        height_px=plan.size_px,
    )
    stamp = data / "synth_plan.json"
    wanted = json.dumps({"seed": seed, **{k: str(v) for k, v in vars(cfg).items()}}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        log.info("data set %s is already there (same plan); reusing it", data)
        return
    with progress_callback("generating scans") as progress:
        synthesize(data, cfg, progress=progress, overwrite=True)
    stamp.write_text(wanted)
    write_preview(data, out / "preview.png")


def _bundles(models: Path, keys: Path, bundles: Path, data: Path) -> dict[str, dict[str, Any]]:
    """Per class: v1.0.0 with fp32 banks (commissioning) and v1.1.0 with int8 banks (the update)."""
    from trainer.bundle import keygen
    from trainer.bundle_build import build_model_bundle, verify_model_bundle
    from trainer.pipeline import export_models

    export_models(models, None, engine=False)
    if not (keys / "bundle_signing.key").is_file():
        keygen(keys)
    shutil.rmtree(bundles, ignore_errors=True)  # the demo owns this folder: a re-run replaces its bundles
    built: dict[str, dict[str, Any]] = {}
    for class_dir in sorted(p.parent for p in models.glob("*/model.json")):
        name = class_dir.name
        v1 = build_model_bundle(class_dir, keys, bundles / f"{name}-1.0.0", "1.0.0", 1, 365, None, None, data)
        v2 = build_model_bundle(
            class_dir, keys, bundles / f"{name}-1.1.0", "1.1.0", 2, 365, "int8", None, data
        )
        for summary in (v1, v2):
            report = verify_model_bundle(Path(summary["path"]), keys, None)
            if not report["ok"]:
                raise RuntimeError(f"fresh bundle {summary['path']} failed verification: {report}")
        built[name] = {"v1": v1, "v2": v2}
    return built


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3  # type: ignore[return-value]
    p50, p95, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95, 99])
    return float(p50), float(p95), float(p99)


def _agreement(rows: list[dict[str, Any]], feeds: list, offline: dict) -> dict[str, dict[str, Any]]:
    """Per station: the part results stored, and how many match the offline decision for the same scan."""
    per_station: dict[str, dict[str, Any]] = {}
    for plan in feeds:
        expected = {
            f"{path.parent.parent.name}/{path.stem}": offline[plan.class_name][path]
            for path in plan.rgb_files
        }
        mine = [r for r in rows if r["station_id"] == plan.station_id and r["frame_id"] in expected]
        seen: dict[str, int] = {}
        for r in mine:
            seen[r["frame_id"]] = seen.get(r["frame_id"], 0) + 1
        agree = [r for r in mine if r["decision"] == expected[r["frame_id"]].decision]
        deltas = [
            abs(r["image_score"] - expected[r["frame_id"]].image_score)
            for r in mine
            if r["image_score"] is not None
        ]
        latencies = [r["latency_total_ms"] for r in mine if r.get("latency_total_ms") is not None]
        counts = {d: sum(1 for r in mine if r["decision"] == d) for d in ("OK", "NOK", "ERROR")}
        p50, p95, p99 = _percentiles(latencies)
        per_station[plan.station_id] = {
            "class": plan.class_name,
            "bundles": sorted({r["bundle_version"] for r in mine}),
            "scans": len(expected),
            "stored": len(mine),
            "stored_once": sum(1 for c in seen.values() if c == 1),
            "counts": counts,
            "nok_rate": counts["NOK"] / len(mine) if mine else float("nan"),
            "latency_ms": {"p50": p50, "p95": p95, "p99": p99},
            "agree": len(agree),
            "max_score_delta": max(deltas) if deltas else float("nan"),
        }
    return per_station


def _summary_table(per_station: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="fleet results (from the collector) vs offline scoring of the same scans")
    for col in ("station", "class", "bundle", "scans", "stored once", "OK/NOK/ERR", "NOK rate"):
        table.add_column(col)
    for col in ("p50 ms", "p95 ms", "p99 ms", "agree", "max |Δscore|"):
        table.add_column(col, justify="right")
    for sid, s in per_station.items():
        lat, c = s["latency_ms"], s["counts"]
        table.add_row(
            sid,
            s["class"],
            ",".join(s["bundles"]),
            str(s["scans"]),
            str(s["stored_once"]),
            f"{c['OK']}/{c['NOK']}/{c['ERROR']}",
            f"{s['nok_rate']:.2f}",
            f"{lat['p50']:.0f}",
            f"{lat['p95']:.0f}",
            f"{lat['p99']:.0f}",
            f"{s['agree']}/{s['scans']}",
            f"{s['max_score_delta']:.1e}",
        )
    return table


def _run_fleet(out: Path, plan: DemoPlan, built: dict, keys: Path, data: Path, keep_running: bool,
               timings: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    from trainer.demo_feeds import offline_decisions
    from trainer.demo_fleet import (
        FleetPaths,
        bring_up,
        collect_results,
        feeds_for,
        make_keys,
        roll_out,
        start_stations,
        stream_parts,
        wait_for_baseline,
        wait_forever,
        write_station_toml,
    )
    from trainer.fleet_procs import ProcessGroup, m3dm_argv

    fleet = out / "fleet"
    shutil.rmtree(fleet, ignore_errors=True)
    paths = FleetPaths.under(fleet)
    with ProcessGroup(paths.logs) as group:
        with stage("fleet", timings, paths.logs):
            fleet.mkdir(parents=True, exist_ok=True)
            make_keys(paths, list(plan.stations))
            feeds = feeds_for(data, fleet, plan.stations)
            ends = bring_up(group, paths, keys, out / "bundles")
            configs = {
                sid: write_station_toml(paths, sid, cls, Path(built[cls]["v1"]["path"]), keys, ends)
                for sid, cls in plan.stations.items()
            }
            running = start_stations(group, configs)
            console.print(
                f"collector {ends.collector}, registry {ends.registry}, dashboard {ends.dashboard_url}"
            )
        rollouts = {}
        with stage("rollout", timings, paths.logs):
            wait_for_baseline(group, paths, list(plan.stations), per_station=6)
            for cls in plan.classes:
                if cls not in plan.stations.values():
                    continue
                status = roll_out(paths, Path(built[cls]["v2"]["tar"]), keys, cls, plan.size_px <= 224)
                rollouts[cls] = status
                waves = ", ".join(
                    f"{s['station_id']} (wave {s['wave']}): {s['state']}" for s in status["stations"]
                )
                console.print(f"{cls} 1.1.0 rolled out: {status['state']}; {waves}")
                group.check_alive()
        with stage("stream", timings, paths.logs):
            stream_parts(group, running, configs, feeds)
        with stage("summary", timings, paths.logs):
            offline = {
                cls: offline_decisions(Path(built[cls]["v2"]["path"]), keys, data, cls)
                for cls in set(plan.stations.values())
            }
            per_station = _agreement(collect_results(paths), feeds, offline)
            console.print(_summary_table(per_station))
        result = {"fleet": str(fleet), "dashboard": ends.dashboard_url, "db": paths.db_url,
                  "logs": str(paths.logs), "rollouts": rollouts, "stations": per_station}  # fmt: skip
        if keep_running:
            console.print(f"[bold]fleet is up[/]: dashboard {ends.dashboard_url} (Ctrl-C stops everything)")
            for feed in feeds:  # live traffic for the dashboard: each station loops over its parts
                source = f"folder:{feed.folder}?loop=1&fps=1"
                group.start(f"{feed.station_id}-live", m3dm_argv("edge", "run", "--config",
                            str(configs[feed.station_id]), "--source", source))  # fmt: skip
            wait_forever(group)
    return result


def run_demo(
    out: Path, seed: int = 0, size: int | None = None, quick: bool = False, keep_running: bool = False
) -> dict[str, Any]:
    """Run every stage; raises DemoError naming the failed stage. Returns the summary (also as JSON)."""
    from trainer.evaluate import evaluate_models
    from trainer.pipeline import train_classes

    plan = DemoPlan.default(quick, size)
    out.mkdir(parents=True, exist_ok=True)
    data, models, keys = out / "data", out / "models", out / "keys"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with stage("data", timings):
        _synth(data, out, plan, seed)
    with stage("train", timings):
        train_classes(data, models, list(plan.classes), False, "m3dm-free", None, False, seed)
    with stage("eval", timings):
        results = evaluate_models(data, models, models / "report", None)
        console.print(Markdown(results["markdown"]))
    with stage("bundles", timings):
        built = _bundles(models, keys, out / "bundles", data)
    fleet = _run_fleet(out, plan, built, keys, data, keep_running, timings)
    agree = all(s["agree"] == s["scans"] == s["stored_once"] for s in fleet["stations"].values())
    summary = {
        "out": str(out),
        "quick": quick,
        "plan": {"classes": list(plan.classes), "stations": plan.stations, "size_px": plan.size_px},
        "mean": results["mean"],
        "bundles": {c: {k: v["path"] for k, v in b.items()} for c, b in built.items()},
        **fleet,
        "all_agree": agree,
        "timings_s": timings,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    verdict = (
        "[bold green]every scan stored once, same decision as offline[/]"
        if agree
        else "[bold red]MISMATCH[/]"
    )
    console.print(
        f"demo done in {summary['wall_s']:.0f} s: {verdict}\n"
        f"  dashboard (while running): {fleet['dashboard']}\n  report: {models / 'report'}\n"
        f"  bundles: {out / 'bundles'}\n  fleet logs: {fleet['logs']}\n  fleet db: {fleet['db']}\n"
        f"  summary: {out / 'demo_summary.json'}"
    )
    if not agree:
        raise DemoError("summary", "fleet results disagree with offline scoring", Path(fleet["logs"]))
    return summary
