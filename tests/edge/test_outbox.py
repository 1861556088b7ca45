"""The station outbox: identity (epoch per boot, contiguous seq), acks, the full-outbox policy (NOK kept over
OK, every drop counted), a full disk (SQLite's own page quota, and a real 1 MiB tmpfs where we may mount
one), a wall clock that jumps backwards, and one process per file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reliability.figures import record

from edge.outbox import Outbox, OutboxBusyError, OutboxLimits
from protocol.frames import decode
from protocol.messages import Blob, InspectionResult


def fields(i: int, decision: str = "OK", blob_bytes: int = 0) -> tuple[dict, list[bytes]]:
    f = {
        "frame_id": f"f{i:05d}",
        "capture_ts": 1000.0 + i,
        "decision_ts": 1000.5 + i,
        "bundle_id": "b",
        "bundle_version": "1",
        "variant": "rgb+point+fusion",
        "decision": decision,
        "image_score": None if decision == "ERROR" else float(i),
    }
    blobs = []
    if blob_bytes:
        payload = os.urandom(blob_bytes)  # incompressible, like a real map on disk
        f["thumbnail"] = Blob(frame=1, codec="raw", size_bytes=len(payload))
        blobs.append(payload)
    return f, blobs


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def stored(ob: Outbox) -> list[InspectionResult]:
    return [decode(p.frames, InspectionResult)[0] for p in ob.pending_results(limit=10**6)]


def test_seq_is_contiguous_and_a_restart_opens_the_next_epoch(tmp_path: Path) -> None:
    path = tmp_path / "ob.db"
    with Outbox(path, "st") as ob:
        first_epoch = ob.epoch
        keys = [ob.add_result(*fields(i)) for i in range(5)]
    assert keys == [(first_epoch, s) for s in range(1, 6)]
    with Outbox(path, "st") as ob:
        assert ob.epoch == first_epoch + 1
        assert ob.add_result(*fields(9)) == (first_epoch + 1, 1)
        msgs = stored(ob)
        # Unacked results of the old epoch go out first, then the new one, each in seq order.
        assert [(m.epoch, m.seq) for m in msgs] == [*keys, (first_epoch + 1, 1)]
        assert {m.station_id for m in msgs} == {"st"}
        assert ob.newest_key() == (first_epoch + 1, 1)


def test_acks_delete_cumulatively_and_by_list_and_events_are_idempotent(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.db", "st") as ob:
        for i in range(10):
            ob.add_result(*fields(i))
        assert ob.ack(ob.epoch, 3, seqs=(7, 9)) == 5
        assert [m.seq for m in stored(ob)] == [4, 5, 6, 8, 10]
        assert ob.ack(ob.epoch, 3) == 0  # an ack repeated after a resend is a no-op
        assert ob.ack(ob.epoch + 5, 100) == 0  # another epoch's ack deletes nothing here
        event = ob.add_event("bundle_loaded", {"v": "1"}, event_id="e1")
        assert ob.add_event("bundle_loaded", {"v": "1"}, event_id="e1") == event
        assert ob.event_depth() == 1
        ob.ack(ob.epoch, 0, event_ids=("e1",))
        assert ob.event_depth() == 0
        assert ob.stats().depth == 5


def test_a_result_the_collector_would_refuse_is_refused_here_and_uses_no_seq(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.db", "st") as ob:
        f, _ = fields(0, blob_bytes=10)
        with pytest.raises(ValueError, match="refused"):
            ob.add_result(f, [])  # the thumbnail's frame is missing
        with pytest.raises(ValueError, match="fields"):
            ob.add_result({"frame_id": "x", "colour": "red"})
        assert ob.add_result(*fields(1)) == (ob.epoch, 1)
        assert ob.depth() == 1


def test_full_outbox_drops_ok_then_error_then_nok_and_counts_every_drop(tmp_path: Path) -> None:
    path = tmp_path / "ob.db"
    with Outbox(path, "st", OutboxLimits(max_rows=4)) as ob:
        for i, decision in enumerate(["NOK", "OK", "ERROR", "OK", "NOK", "OK", "ERROR", "NOK"]):
            ob.add_result(*fields(i, decision))
        kept = stored(ob)
        # 8 in, 4 kept: the three OK go first, then the oldest ERROR; every NOK is kept.
        assert [(m.seq, m.decision) for m in kept] == [(1, "NOK"), (5, "NOK"), (7, "ERROR"), (8, "NOK")]
        assert ob.stats().dropped == {
            "dropped_ok": 3,
            "dropped_error": 1,
            "dropped_nok": 0,
            "dropped_disk_full": 0,
            "dead_letters": 0,
        }
        ob.add_result(*fields(8, "OK"))  # only NOK/ERROR stored: the new OK is the one dropped
        assert [m.seq for m in stored(ob)] == [1, 5, 7, 8]
        ob.add_result(*fields(9, "NOK"))  # a new NOK pushes out the ERROR
        assert [m.decision for m in stored(ob)] == ["NOK"] * 4
    with Outbox(path, "st", OutboxLimits(max_rows=4)) as ob:  # counters survive a restart
        assert ob.stats().dropped_total == 6
        assert ob.stats().dropped["dropped_ok"] == 4


def test_byte_bound_applies_the_same_policy(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.db", "st", OutboxLimits(max_bytes=50_000)) as ob:
        for i in range(10):
            ob.add_result(*fields(i, "NOK" if i % 3 == 0 else "OK", blob_bytes=9_000))
        assert ob.stats().stored_bytes <= 50_000
        kept = [m.decision for m in stored(ob)]
        assert kept.count("NOK") == 4 and len(kept) == 5
        assert ob.stats().dropped["dropped_ok"] == 5


def _fill_until_full(ob: Outbox, n: int) -> None:
    """Every 4th result NOK, 40 KB each: far more than the disk holds. Must never raise."""
    for i in range(n):
        ob.add_result(*fields(i, "NOK" if i % 4 == 0 else "OK", blob_bytes=40_000))


def _check_full_disk_policy(ob: Outbox, n: int) -> dict:
    kept = stored(ob)
    stats = ob.stats()
    assert stats.dropped["dropped_disk_full"] > 0, "the disk must actually have filled up"
    assert len(kept) + stats.dropped_total == n, "every result is either stored or counted as dropped"
    assert stats.depth == len(kept)
    noks = [m for m in kept if m.decision == "NOK"]
    assert len(noks) >= len(kept) - 1, "NOK results are kept over OK ones (at most the newest OK slips in)"
    assert kept[-1].seq >= n - 4, "the newest results are the ones kept"
    return {
        "submitted": n,
        "submitted_nok": len(range(0, n, 4)),
        "kept": len(kept),
        "kept_nok": len(noks),
        "dropped": stats.dropped,
    }


def test_emulated_disk_quota_full_disk_follows_the_policy(tmp_path: Path) -> None:
    """Emulation, stated as such: `disk_quota_bytes` caps the database file with SQLite's max_page_count,
    which raises the real `database or disk is full` error."""
    with Outbox(tmp_path / "ob.db", "st", OutboxLimits(disk_quota_bytes=600_000)) as ob:
        _fill_until_full(ob, 60)
        figures = _check_full_disk_policy(ob, 60)
        assert (tmp_path / "ob.db").stat().st_size <= 700_000
        record("full_disk_quota_emulated", quota_bytes=600_000, **figures)
        ob.ack(ob.epoch, 10**9)  # everything acked: room again, inserts go in
        assert ob.depth() == 0
        ob.add_result(*fields(99, "OK", blob_bytes=40_000))
        assert ob.depth() == 1


TMPFS_SCRIPT = """
import json
import sys
sys.path[:0] = sys.argv[2:5]
from test_outbox import _check_full_disk_policy, _fill_until_full
from edge.outbox import Outbox, OutboxLimits
with Outbox(sys.argv[1] + "/ob.db", "st", OutboxLimits(min_free_bytes=256 * 1024)) as ob:
    _fill_until_full(ob, 60)
    figures = _check_full_disk_policy(ob, 60)
print(json.dumps(figures))
"""


def test_real_full_tmpfs_follows_the_policy(tmp_path: Path) -> None:
    """A real 1 MiB filesystem under the outbox (root only: CI runs as root; elsewhere the quota emulation
    above covers the policy)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        repo = Path(__file__).resolve().parents[2]
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                TMPFS_SCRIPT,
                str(mnt),
                str(Path(__file__).parent),
                str(repo / "tests"),
                str(repo),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        record("full_disk_tmpfs", filesystem="tmpfs 1 MiB", **json.loads(done.stdout))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_wall_clock_jumping_backwards_changes_neither_order_nor_identity(tmp_path: Path) -> None:
    path = tmp_path / "ob.db"
    clock = Clock(1_800_000_000.0)
    with Outbox(path, "st", clock=clock) as ob:
        epoch = ob.epoch
        assert epoch == 1_800_000_000  # a new file starts its epochs at the clock
        for i in range(3):
            ob.add_result(*fields(i))
        clock.now -= 86_400  # NTP steps the clock a day back mid-stream
        for i in range(3, 6):
            ob.add_result(*fields(i))
        assert [m.seq for m in stored(ob)] == [1, 2, 3, 4, 5, 6]
    clock.now -= 10 * 86_400  # and reboots with an RTC ten days behind
    with Outbox(path, "st", clock=clock) as ob:
        assert ob.epoch == epoch + 1, "the next epoch comes from the file, never from the clock"
        ob.add_result(*fields(6))
        keys = [(m.epoch, m.seq) for m in stored(ob)]
        assert keys == sorted(keys) and len(set(keys)) == 7


def test_one_process_per_outbox_and_one_station_per_file(tmp_path: Path) -> None:
    path = tmp_path / "ob.db"
    with Outbox(path, "st"):
        code = "import sys; from edge.outbox import Outbox; Outbox(sys.argv[1], 'st')"
        done = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30
        )
        assert done.returncode != 0 and "OutboxBusyError" in done.stderr
        with pytest.raises(OutboxBusyError, match="in use by another process"):
            Outbox(path, "st")
    with pytest.raises(ValueError, match="another station"):
        Outbox(path, "other-station")


def test_dead_letter_takes_a_result_out_of_the_queue_and_counts_it(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.db", "st") as ob:
        for i in range(3):
            ob.add_result(*fields(i))
        assert ob.dead_letter(ob.epoch, 2, "bad_message", "refused")
        assert not ob.dead_letter(ob.epoch, 2, "bad_message", "again")
        assert [m.seq for m in stored(ob)] == [1, 3]
        assert ob.stats().dropped["dead_letters"] == 1 and ob.stats().dropped_total == 1
