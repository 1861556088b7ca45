"""Issue 8 done-when and issue 13 faults: a station SIGKILLed mid-stream (its clock an hour back on restart),
and a network cut through a TCP proxy. Every result is stored exactly once, seq contiguous per epoch.

The station is `tests/reliability/station_driver.py`: the real Outbox and Uplink (real CURVE DEALER, real
SQLite outbox) fed with synthetic results instead of a model, so the test is about delivery only and
takes seconds. The collector is `tests/reliability/ack_server.py` (ROUTER + ZAP allow-list + SQLite).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
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
