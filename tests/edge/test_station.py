"""`m3dm edge run` end to end: torch-free, bad files among good ones, to a real CURVE ack endpoint,
a tampered bundle never scores, /metrics and log lines carry station id and bundle version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
M3DM = [sys.executable, "-m", "m3dm"]

# Makes torch, scikit-learn and the trainer unimportable: what a station installed with only the `edge`
# extra sees. Loaded by the interpreter at start-up from PYTHONPATH (sitecustomize).
BLOCKER = """
import sys

class _StationInstall:
    BLOCKED = {"torch", "sklearn", "trainer", "matplotlib"}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is not installed on a station (blocked by the test)")
        return None

sys.meta_path.insert(0, _StationInstall())
"""


@pytest.fixture(scope="module")
def station_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    shim = tmp_path_factory.mktemp("no-torch")
    (shim / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(REPO)])
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "2"
    return env


def run_station(env: dict, args: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*M3DM, "edge", "run", *args], env=env, capture_output=True, text=True, timeout=timeout_s, cwd=REPO
    )


def test_blocker_really_blocks(station_env: dict) -> None:
    for module in ("torch", "sklearn", "trainer.synth"):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {module}"], env=station_env, capture_output=True
        )
        assert proc.returncode != 0 and b"not installed on a station" in proc.stderr


def test_torch_free_station_scores_bad_and_good_files_and_never_exits(
    fleet_bundle: dict, station_env: dict, tmp_path: Path
) -> None:
    """Without torch/sklearn/trainer: each bad file an ERROR naming file and reason, each good one scored."""
    from trainer.synth.corrupt import write_corrupt_set

    expected = write_corrupt_set(
        tmp_path / "scans", fleet_bundle["class_name"], seed=9, size_px=224, n_good=2
    )
    args = [
        "--bundle",
        str(fleet_bundle["bundle"]),
        "--key",
        str(fleet_bundle["keys"]),
        "--station-id",
        "s-free",
    ]
    args += [
        "--source",
        f"folder:{tmp_path / 'scans' / expected['folder']}",
        "--once",
        "--json",
        "--sink",
        "stdout:",
    ]
    proc = run_station(station_env, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    decisions = {d["frame_id"]: d for d in lines if "frame_id" in d}
    summary = lines[-1]
    assert (
        len(decisions) == len(expected["cases"]) and summary["counts"]["ERROR"] == expected["counts"]["bad"]
    )
    for case in expected["cases"]:
        d = decisions[case["stem"]]
        if case["error"] is None:
            assert d["decision"] in ("OK", "NOK") and d["image_score"] is not None
        else:
            assert d["decision"] == "ERROR" and d["error_reason"].startswith(case["error"]), (case, d)
    # the ERROR log line names the file; every log line carries station id and (once loaded) the bundle
    for case in (c for c in expected["cases"] if c["error"]):
        assert any("ERROR" in line and case["file"] in line for line in proc.stderr.splitlines()), case
    log_lines = [line for line in proc.stderr.splitlines() if " m3dm." in line]
    assert log_lines and all("station=s-free bundle=" in line for line in log_lines)
    assert any("bundle=1.0.0" in line for line in log_lines)


def test_tampered_bundle_never_scores_a_frame(fleet_bundle: dict, station_env: dict, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(fleet_bundle["bundle"], bundle)
    victim = next(p for p in sorted(bundle.rglob("*")) if p.is_file() and p.suffix in (".npy", ".onnx"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    data = fleet_bundle["data"] / fleet_bundle["class_name"]
    args = ["--bundle", str(bundle), "--key", str(fleet_bundle["keys"]), "--station-id", "s-bad"]
    proc = run_station(station_env, [*args, "--source", f"folder:{data}", "--once", "--sink", "stdout:"])
    assert proc.returncode == 1
    assert "error: station not started" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""  # not one decision


def test_without_a_key_the_station_refuses_to_start_and_scores_nothing(
    fleet_bundle: dict, station_env: dict
) -> None:
    good = fleet_bundle["data"] / fleet_bundle["class_name"] / "test" / "good"
    args = ["--bundle", str(fleet_bundle["bundle"]), "--station-id", "s-nokey", "--source", f"folder:{good}"]
    proc = run_station(station_env, [*args, "--once", "--sink", "stdout:"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: no bundle signing key" in proc.stderr and "--insecure-no-verify" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""  # not one decision


def test_edge_score_without_a_key_refuses_and_prints_no_score(fleet_bundle: dict, station_env: dict) -> None:
    good = fleet_bundle["data"] / fleet_bundle["class_name"] / "test" / "good"
    cmd = [*M3DM, "edge", "score", str(good), "--bundle", str(fleet_bundle["bundle"]), "--json"]
    proc = subprocess.run(cmd, env=station_env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: no bundle signing key" in proc.stderr and "--insecure-no-verify" in proc.stderr
    assert proc.stdout.strip() == ""


def test_insecure_no_verify_scores_an_unsigned_bundle_with_one_loud_line(
    fleet_bundle: dict, station_env: dict, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(fleet_bundle["bundle"], bundle)
    (bundle / "manifest.sig").unlink()  # no signature at all: only the explicit flag lets it score
    good = fleet_bundle["data"] / fleet_bundle["class_name"] / "test" / "good"
    args = ["--bundle", str(bundle), "--station-id", "s-lab", "--source", f"folder:{good}", "--once"]
    proc = run_station(station_env, [*args, "--json", "--sink", "stdout:", "--insecure-no-verify"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["counts"]["OK"] + summary["counts"]["NOK"] == 3
    loud = [line for line in proc.stderr.splitlines() if "INSECURE" in line]
    assert len(loud) == 1 and " ERROR " in loud[0] and "WITHOUT signature verification" in loud[0]


def test_station_delivers_every_result_to_a_curve_collector_endpoint(
    fleet_bundle: dict, station_env: dict, tmp_path: Path
) -> None:
    """Real processes, real CURVE: each result stored once, seqs 1..n, --once exits 0 once all are acked."""
    from reliability.harness import AckServer, make_keys

    keys = make_keys(tmp_path / "keys")
    station_keys = keys.station("s-net")
    good = fleet_bundle["data"] / fleet_bundle["class_name"] / "test" / "good"
    args = [
        "--bundle",
        str(fleet_bundle["bundle"]),
        "--key",
        str(fleet_bundle["keys"]),
        "--station-id",
        "s-net",
    ]
    args += [
        "--source",
        f"folder:{good}",
        "--once",
        "--json",
        "--sink",
        "stdout:",
        "--outbox",
        str(tmp_path / "ob.db"),
    ]
    with AckServer(tmp_path, keys) as server:
        args += ["--collector", server.endpoint, "--curve-dir", str(station_keys)]
        proc = run_station(station_env, [*args, "--collector-key", str(keys.collector_public)])
        rows = server.rows()
        events = server.events()
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["delivered"] and summary["uplink"]["outbox_depth"] == 0
    assert sorted(r[3] for r in rows) == ["000", "001", "002"]
    assert {r[0] for r in rows} == {"s-net"} and [r[2] for r in rows] == [1, 2, 3]
    assert any(kind == "bundle_loaded" for _, _, kind in events)


def test_metrics_endpoint_serves_station_series(fleet_bundle: dict) -> None:
    from edge.config import StationConfig
    from edge.station import Station

    good = fleet_bundle["data"] / fleet_bundle["class_name"] / "test" / "good"
    cfg = StationConfig(
        station_id="s-metrics",
        bundle=fleet_bundle["bundle"],
        key=fleet_bundle["keys"],
        source=f"folder:{good}",
        sinks=(),
    )
    station = Station.open(cfg)
    server, port = station.metrics.serve(0, "127.0.0.1")
    try:
        summary = station.run(once=True)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert sum(summary["counts"].values()) == 3
    n_scored = summary["counts"]["OK"] + summary["counts"]["NOK"]
    assert f'm3dm_station_stage_latency_seconds_count{{stage="features"}} {float(n_scored)}' in text
    assert 'm3dm_station_queue_depth{queue="after_capture"}' in text
    assert 'bundle_version="1.0.0"' in text and 'backend="onnxruntime-cpu"' in text
    assert "m3dm_station_fps" in text and "m3dm_station_e2e_latency_seconds_bucket" in text


def test_edge_score_prints_json_results_torch_free(fleet_bundle: dict, station_env: dict) -> None:
    from core.mvtec3d import read_rgb, read_xyz
    from core.scan import RawScan
    from edge.station_model import open_bundle

    good = fleet_bundle["data"] / fleet_bundle["class_name"] / "test" / "good"
    files = [good / "xyz" / "000.tiff", good / "rgb" / "001.png"]
    cmd = [*M3DM, "edge", "score", *map(str, files), "--bundle", str(fleet_bundle["bundle"])]
    cmd += ["--key", str(fleet_bundle["keys"]), "--json"]
    proc = subprocess.run(cmd, env=station_env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert [r["frame_id"] for r in results] == ["000", "001"]
    model = open_bundle(fleet_bundle["bundle"], fleet_bundle["keys"])
    raw = RawScan(read_rgb(good / "rgb" / "001.png"), read_xyz(good / "xyz" / "001.tiff"))
    expected = model.score_raw(raw).image["rgb+point+fusion"]
    assert results[1]["image_score"] == pytest.approx(expected, abs=1e-5)
    assert results[1]["decision"] in ("OK", "NOK") and results[1]["bank_scores"].keys() == {
        "rgb",
        "point",
        "fusion",
    }
