"""No bad file takes a station down: the corrupt set (`m3dm synth --corrupt`) streamed through a real station.

Every bad case must come out as an ERROR result whose reason names the file at fault and the typed error
expected.json lists, every good scan as a scored OK/NOK, and the station must keep going: it replays the
folder in a loop, is seen alive after two full passes, and stops cleanly only when told to (SIGTERM).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
from reliability import servers
from reliability.figures import record
from reliability.harness import make_keys

from trainer.synth.corrupt import write_corrupt_set

pytestmark = pytest.mark.integration

M3DM = servers.M3DM


@pytest.fixture(scope="module")
def corrupt(fleet_bundle: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corrupt-input")
    expected = write_corrupt_set(root, fleet_bundle["class_name"], seed=11, size_px=224, n_good=3)
    return root, expected


def _by_frame(expected: dict) -> dict[str, dict]:
    """frame id as the folder source names it (`good/NNN`, relative to <class>/test) -> expected entry."""
    return {f"good/{e['stem']}": e for e in expected["cases"]}


def _check_result(
    root: Path, entry: dict, decision: str, score: float | None, reason: str, file: str
) -> None:
    case = entry["case"]
    if entry["error"] is None:
        assert decision in ("OK", "NOK"), f"good scan {case} {entry['stem']}: {decision} {reason}"
        assert score is not None and math.isfinite(score)
        return
    assert decision == "ERROR", f"{case}: {decision} with score {score}"
    assert score is None
    assert reason.startswith(entry["error"]), f"{case}: reason {reason!r}, wanted {entry['error']}"
    assert file == str(root / entry["file"]), f"{case}: names {file}, wanted {entry['file']}"


def test_edge_score_gives_every_bad_file_an_error_naming_it(fleet_bundle: dict, corrupt) -> None:
    root, expected = corrupt
    folder = root / expected["folder"]
    cmd = [*M3DM, "edge", "score", str(folder), "--bundle", str(fleet_bundle["bundle"])]
    cmd += ["--key", str(fleet_bundle["keys"]), "--backend", "ort", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=servers.env())
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    want = {f"good/{e['stem']}": e for e in expected["cases"]}
    got = {r["frame_id"]: r for r in results}
    assert sorted(got) == sorted(want), "one result per pair, missing pairs included"
    for frame_id, entry in want.items():
        r = got[frame_id]
        _check_result(
            root, entry, r["decision"], r["image_score"], r["error_reason"] or "", r["error_file"] or ""
        )


def _wait_stored(workdir: Path, n: int, proc: subprocess.Popen, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    stored = 0
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the station exited ({proc.returncode}) after {stored} stored results"
        stored = servers.stored_count(workdir, "bad-input")
        if stored >= n:
            return stored
        time.sleep(0.3)
    raise AssertionError(f"only {stored} of {n} results reached the collector in {timeout_s} s")


def test_station_streams_the_corrupt_set_and_keeps_running(
    fleet_bundle: dict, corrupt, tmp_path: Path
) -> None:
    """`m3dm edge run` replays the corrupt folder in a loop into `m3dm collector serve`; the collector's
    query CLI then shows each result with the reason and the file, exactly as a quality engineer sees it."""
    root, expected = corrupt
    frames = _by_frame(expected)
    keys = make_keys(tmp_path / "keys")
    station_keys = keys.station("bad-input")
    source = f"folder:{root / expected['class']}?loop=1"
    with servers.collector(tmp_path, keys.collector_dir, keys.allow_dir) as collector:
        cmd = [
            *M3DM,
            "edge",
            "run",
            "--bundle",
            str(fleet_bundle["bundle"]),
            "--key",
            str(fleet_bundle["keys"]),
        ]
        cmd += ["--station-id", "bad-input", "--source", source, "--collector", collector.endpoint]
        cmd += ["--curve-dir", str(station_keys), "--collector-key", str(keys.collector_public)]
        cmd += ["--outbox", str(tmp_path / "outbox.sqlite"), "--backend", "ort", "--backpressure", "block"]
        cmd += ["--sink", "stdout:"]
        with (tmp_path / "station.out").open("wb") as out, (tmp_path / "station.err").open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=servers.env())
            try:
                _wait_stored(tmp_path, 2 * len(frames), proc, timeout_s=150)
                assert proc.poll() is None, "the station must still run after two passes over bad files"
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        time.sleep(0.5)  # the last acked batch is committed before its ack; let the query see it
        query = [*M3DM, "collector", "query", "--db", servers.db_url(tmp_path), "--station", "bad-input"]
        done = subprocess.run(
            [*query, "--limit", "10000", "--json"], capture_output=True, text=True, timeout=60
        )
    assert code == 0, (tmp_path / "station.err").read_text()[-3000:]
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert len({(r["epoch"], r["seq"]) for r in rows}) == len(rows), "a result stored twice"
    passes: dict[str, int] = {}
    for r in rows:
        entry = frames[r["frame_id"].partition("#")[0]]
        passes[entry["case"]] = passes.get(entry["case"], 0) + 1
        _check_result(
            root, entry, r["decision"], r["image_score"], r["error_reason"] or "", r["error_file"] or ""
        )
    assert all(passes.get(e["case"], 0) >= 2 for e in expected["cases"]), passes
    lines = [json.loads(x) for x in (tmp_path / "station.out").read_text().splitlines() if x.startswith("{")]
    sink = {line["frame_id"]: line["decision"] for line in lines}
    assert all(sink.get(r["frame_id"]) == r["decision"] for r in rows), "the line saw another decision"
    record(
        "bad_input_station",
        frames_per_pass=len(frames),
        bad_per_pass=expected["counts"]["bad"],
        results_stored=len(rows),
        errors=sum(1 for r in rows if r["decision"] == "ERROR"),
        scored=sum(1 for r in rows if r["decision"] in ("OK", "NOK")),
        cases_seen_at_least_twice=len(passes),
        station_exit=code,
    )
