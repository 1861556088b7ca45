"""Issue 8 done-when and issue 13 faults: a station SIGKILLed mid-stream (its clock an hour back on restart),
and a network cut through a TCP proxy. Every result is stored exactly once, seq contiguous per epoch.

The station is `tests/reliability/station_driver.py`: the real Outbox and Uplink (real CURVE DEALER, real
SQLite outbox) fed with synthetic results instead of a model, so the test is about delivery only and
takes seconds. The collector is `tests/reliability/ack_server.py` (ROUTER + ZAP allow-list + SQLite).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from reliability import servers
from reliability.figures import record
from reliability.harness import AckServer, Driver, make_keys, outbox_depth, outbox_epochs, reconcile
from reliability.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


def test_station_sigkill_mid_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    station_keys = keys.station("st-kill")
    with AckServer(tmp_path, keys) as server:
        with Driver(tmp_path, "st-kill", station_keys, keys, server.endpoint, 5000, "--run", "a") as first:
            first.wait_lines(150, timeout_s=30)
            # Freeze the collector so results pile up unacked (some in flight, some only in the outbox),
            # then kill the station without warning and let the collector go on with what it received.
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                seen = len(first.lines)
                first.wait_lines(seen + 150, timeout_s=30)
                first.kill()
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
        printed_first = list(first.lines)
        assert len(printed_first) < 5000, "the station must die mid-stream"
        left_unacked = outbox_depth(first.outbox)
        assert left_unacked >= 100, "the kill must leave unacked results behind for the restart to resend"

        # Restart on the same outbox with the wall clock an hour behind (an RTC reset at boot).
        args = ("--run", "b", "--clock-jump-back", 3600, "--jump-at", 0)
        with Driver(tmp_path, "st-kill", station_keys, keys, server.endpoint, 200, *args) as second:
            assert second.wait(timeout_s=60) == 0, second.log()[-3000:]
        assert second.final is not None and second.final["drained"], second.final
        assert second.final["stats"]["resent"] >= left_unacked
        assert outbox_depth(second.outbox) == 0

        assigned = outbox_epochs(second.outbox)
        epoch_a, epoch_b = sorted(assigned)
        assert epoch_b == epoch_a + 1, "a restart opens the next epoch whatever the clock says"
        assert assigned[epoch_b] == 200
        assert assigned[epoch_a] >= len(printed_first)
        rows = server.rows()
        figures = reconcile(rows, "st-kill", assigned, printed_first + second.lines)
        assert figures["stored"] == assigned[epoch_a] + 200
        # The clock went back, yet the later epoch's results sort after the earlier one's by identity.
        first_ts = max(r[5] for r in rows if r[1] == epoch_a)
        second_ts = min(r[5] for r in rows if r[1] == epoch_b)
        assert second_ts < first_ts - 3000
        assert server.duplicates() > 0, "the resend must have delivered some results twice (deduplicated)"
        record(
            "station_sigkill",
            sent=sum(assigned.values()),
            stored=figures["stored"],
            lost=0,
            duplicated=0,
            unacked_at_kill=left_unacked,
            resent=second.final["stats"]["resent"],
            deduplicated_by_collector=server.duplicates(),
            epochs=len(assigned),
            clock_back_s=3600,
        )
        kinds = [e[2] for e in server.events()]
        assert kinds.count("started") == 2


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_network_cut_through_proxy_reconciles_exactly(tmp_path: Path, mode: str) -> None:
    keys = make_keys(tmp_path / "keys")
    station_keys = keys.station("st-cut")
    with AckServer(tmp_path, keys) as server, TcpProxy("127.0.0.1", server.port) as proxy:
        args = ("--run", "c", "--rate", 150, "--heartbeat-s", 0.3, "--dead-after", 4)
        with Driver(tmp_path, "st-cut", station_keys, keys, proxy.endpoint, 600, *args) as station:
            station.wait_lines(100, timeout_s=30)
            proxy.cut(mode)
            cut_at = len(station.lines)
            time.sleep(2.5)  # longer than dead_after x heartbeat: the station gives the link up
            stored_during_cut = len(server.rows())
            proxy.heal()
            assert station.wait(timeout_s=60) == 0, station.log()[-3000:]
        assert station.final is not None and station.final["drained"]
        assert len(station.lines) - cut_at > 300, "the station went on scoring while the link was down"
        stats = station.final["stats"]
        assert stats["reconnects"] + proxy.connections_reset >= 1
        assert proxy.connections_accepted >= 2, "the station reconnected after the cut"
        assigned = outbox_epochs(station.outbox)
        figures = reconcile(server.rows(), "st-cut", assigned, station.lines)
        assert figures["stored"] == 600
        assert stored_during_cut < 600
        record(
            f"network_cut_{mode}",
            sent=600,
            stored=figures["stored"],
            lost=0,
            duplicated=0,
            cut_s=2.5,
            stored_during_cut=stored_during_cut,
            reconnects=stats["reconnects"],
            resent=stats["resent"],
        )


def _edge_run(fleet_bundle: dict, keys, station_keys: Path, endpoint: str, outbox: Path, source: str, *extra):
    cmd = [
        *servers.M3DM,
        "edge",
        "run",
        "--bundle",
        str(fleet_bundle["bundle"]),
        "--key",
        str(fleet_bundle["keys"]),
    ]
    cmd += ["--station-id", "st-cli", "--source", source, "--collector", endpoint, "--outbox", str(outbox)]
    cmd += ["--curve-dir", str(station_keys), "--collector-key", str(keys.collector_public)]
    cmd += ["--backend", "ort", "--backpressure", "block", *extra]
    return cmd


def _wait_for(predicate, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"the station exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_real_station_sigkill_mid_stream_into_real_collector(fleet_bundle: dict, tmp_path: Path) -> None:
    """Issue 8's done-when with the real commands: `m3dm edge run` scoring a generated class into
    `m3dm collector serve`, SIGKILLed mid-stream (with unacked results in its outbox), restarted with
    --once on the same outbox: every result stored exactly once, seq contiguous per epoch."""
    keys = make_keys(tmp_path / "keys")
    station_keys = keys.station("st-cli")
    outbox = tmp_path / "outbox.sqlite"
    test_dir = fleet_bundle["data"] / fleet_bundle["class_name"] / "test"
    # The restart scores only test/good (a finite folder, --once): enough for a second epoch, and quick.
    n_frames = sum(1 for _ in (test_dir / "good").glob("rgb/*.png"))
    with servers.collector(tmp_path, keys.collector_dir, keys.allow_dir) as collector:
        first_cmd = _edge_run(
            fleet_bundle, keys, station_keys, collector.endpoint, outbox, f"folder:{test_dir}?loop=1"
        )
        with (tmp_path / "station1.err").open("wb") as err:
            first = subprocess.Popen(first_cmd, stdout=subprocess.DEVNULL, stderr=err, env=servers.env())
            try:
                _wait_for(
                    lambda: servers.stored_count(tmp_path, "st-cli") >= 3, first, 120, "3 stored results"
                )
                os.kill(collector.proc.pid, signal.SIGSTOP)  # acks stop; results pile up in the outbox
                try:
                    _wait_for(lambda: outbox_depth(outbox) >= 3, first, 60, "3 unacked results")
                finally:
                    first.kill()
                    first.wait(timeout=10)
                    os.kill(collector.proc.pid, signal.SIGCONT)
            finally:
                if first.poll() is None:
                    first.kill()
                    first.wait(timeout=10)
        assert outbox_depth(outbox) >= 3
        second_cmd = _edge_run(
            fleet_bundle,
            keys,
            station_keys,
            collector.endpoint,
            outbox,
            f"folder:{test_dir / 'good'}",
            "--once",
        )
        second = subprocess.run(second_cmd, capture_output=True, text=True, timeout=180, env=servers.env())
        assert second.returncode == 0, second.stderr[-3000:]
        time.sleep(0.5)
        query = [*servers.M3DM, "collector", "query", "--db", servers.db_url(tmp_path), "--station", "st-cli"]
        done = subprocess.run(
            [*query, "--limit", "100000", "--json"], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        ("st-cli", r["epoch"], r["seq"], r["frame_id"], r["decision"], r["capture_ts"], 0)
        for r in json.loads(done.stdout)
    ]
    assert outbox_depth(outbox) == 0
    assigned = outbox_epochs(outbox)
    epoch_a, epoch_b = sorted(assigned)
    assert epoch_b == epoch_a + 1
    assert assigned[epoch_b] == n_frames > 0, "the restarted station scored the finite folder once"
    figures = reconcile(rows, "st-cli", assigned, [])
    assert figures["stored"] == assigned[epoch_a] + n_frames
    record(
        "station_sigkill_real", sent=sum(assigned.values()), stored=figures["stored"], lost=0, duplicated=0
    )
