"""Sample inspection results for the dashboard tests: real wire messages with a quantised map and a JPEG.

The thumbnail is a drawn ring-shaped part with a dark dent; the anomaly map peaks on the dent. Results go into
the collector through its real record builder and Store (`store_results`), exactly as ingest stores them.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from collector.records import result_record
from collector.store import HeartbeatIn, Store
from protocol.frames import quantise_map
from protocol.messages import Blob, Heartbeat, InspectionResult, StationEvent

MAP_HW = (224, 224)
VARIANT = "rgb+point+fusion"
# Two bundles in the fleet: history stations 0, 2, ... still run 1.0.0; stations 1, 3, ... run 1.1.0.
BUNDLE_OLD = ("b" * 16, "1.0.0")
BUNDLE_NEW = ("c" * 16, "1.1.0")


def station_bundle(s_index: int) -> tuple[str, str]:
    return BUNDLE_OLD if s_index % 2 == 0 else BUNDLE_NEW


def score_quantiles(mean: float, std: float) -> list[float]:
    """21 reference quantiles (0, 5, ..., 100 %) of a normal score distribution, as a manifest carries."""
    from statistics import NormalDist

    inner = [NormalDist(mean, std).inv_cdf(p / 20) for p in range(1, 20)]
    return [mean - 4 * std, *inner, mean + 4 * std]


def history_score(s_index: int) -> tuple[float, float]:
    """(mean, std) of the OK scores `fleet_history` draws for station number `s_index`."""
    return 1.2 + 0.1 * s_index, 0.22


def part_thumbnail(defect_yx: tuple[float, float] | None, size_px: int = 160, seed: int = 0) -> bytes:
    """JPEG of a shaded metal ring on a dark belt; a dent at `defect_yx` (fractions of the side) if given."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(np.float32) / size_px
    r = np.hypot(yy - 0.5, xx - 0.5)
    ring = np.clip(1.0 - np.abs(r - 0.3) / 0.12, 0.0, 1.0) ** 0.6
    shade = 0.55 + 0.45 * np.clip((0.5 - yy) + (0.5 - xx) + 0.6, 0.0, 1.2) / 1.2
    belt = 0.16 + 0.03 * rng.standard_normal((size_px, size_px)).astype(np.float32)
    grey = belt * (1 - ring) + ring * shade * 0.85
    if defect_yx is not None:
        d = np.hypot(yy - defect_yx[0], xx - defect_yx[1])
        grey = grey * (1.0 - 0.75 * np.exp(-((d / 0.035) ** 2)))
    rgb = np.stack([grey * 0.95, grey * 0.97, grey * 1.05], axis=2)
    out = io.BytesIO()
    Image.fromarray(np.clip(rgb * 255, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=88)
    return out.getvalue()


def anomaly_map(defect_yx: tuple[float, float] | None, seed: int = 0) -> np.ndarray:
    """(224, 224) float32 map: low smooth noise, plus a peak at `defect_yx` (fractions) if given."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((8, 8)).astype(np.float32)
    noise = np.asarray(
        Image.fromarray((coarse * 255).astype(np.uint8)).resize(MAP_HW, Image.Resampling.BICUBIC)
    )
    values = 0.25 + 0.15 * noise.astype(np.float32) / 255.0
    if defect_yx is not None:
        yy, xx = np.mgrid[0 : MAP_HW[0], 0 : MAP_HW[1]].astype(np.float32) / MAP_HW[0]
        d2 = (yy - defect_yx[0]) ** 2 + (xx - defect_yx[1]) ** 2
        values = values + 1.6 * np.exp(-d2 / (2 * 0.07**2))
    return values.astype(np.float32)


def ring_point(angle_rad: float) -> tuple[float, float]:
    """A point on the drawn ring (fractions of the side): where a dent can be."""
    return 0.5 + 0.3 * float(np.sin(angle_rad)), 0.5 + 0.3 * float(np.cos(angle_rad))


def inspection(
    station_id: str,
    seq: int,
    decision: str,
    image_score: float,
    threshold: float,
    defect_yx: tuple[float, float] | None = None,
    with_images: bool = True,
    epoch: int = 1,
    decision_ts: float | None = None,
    total_ms: float = 80.0,
    bundle: tuple[str, str] = BUNDLE_OLD,
) -> tuple[InspectionResult, list[bytes]]:
    """One InspectionResult and its blob frames (map frame 1, thumbnail frame 2), as a station sends it."""
    now = time.time() if decision_ts is None else decision_ts
    blobs: list[bytes] = []
    map_meta = thumb = None
    if with_images:
        map_meta, map_payload = quantise_map(anomaly_map(defect_yx, seed=seq), frame=1)
        jpeg = part_thumbnail(defect_yx, seed=seq)
        thumb = Blob(frame=2, codec="jpeg", size_bytes=len(jpeg))
        blobs = [map_payload, jpeg]
    msg = InspectionResult(
        station_id=station_id,
        epoch=epoch,
        seq=seq,
        frame_id=f"{station_id}-lot7-{seq:05d}",
        capture_ts=now - total_ms / 1000.0,
        decision_ts=now,
        bundle_id=bundle[0],
        bundle_version=bundle[1],
        variant=VARIANT,
        decision=decision,
        image_score=image_score,
        threshold=threshold,
        latency_ms={"total": total_ms, "features": total_ms * 0.7},
        anomaly_map=map_meta,
        thumbnail=thumb,
    )
    return msg, blobs


def store_results(
    store: Store, results: list[tuple[InspectionResult, list[bytes]]], fps: float = 0.0
) -> None:
    """Store results plus one heartbeat per station (liveness, bundle, fps) in one committed batch."""
    records = [result_record(msg, blobs) for msg, blobs in results]
    beats = {
        msg.station_id: HeartbeatIn(
            Heartbeat(
                sender=msg.station_id,
                epoch=msg.epoch,
                ts=time.time(),
                bundle_id=msg.bundle_id,
                bundle_version=msg.bundle_version,
                fps=fps,
            )
        )
        for msg, _ in results
    }
    store.insert_batch(results=records, heartbeats=list(beats.values()))


def fleet_history(
    stations: tuple[str, ...] = ("press-01", "press-02"), n_ok: int = 60, seed: int = 3
) -> list:
    """A plausible last few minutes per station: normal OK scores below the threshold, a few NOKs above."""
    rng = np.random.default_rng(seed)
    now = time.time()
    out = []
    for s_index, station in enumerate(stations):
        threshold = 2.0 + 0.3 * s_index
        for seq in range(1, n_ok + 1):
            score = float(rng.normal(*history_score(s_index)))
            decision = "NOK" if score >= threshold else "OK"
            ts = now - 240 + seq * 240 / n_ok
            total_ms = float(rng.gamma(9.0, 7.0 + 2.0 * s_index))
            out.append(
                inspection(
                    station,
                    seq,
                    decision,
                    score,
                    threshold,
                    None,
                    False,
                    decision_ts=ts,
                    total_ms=total_ms,
                    bundle=station_bundle(s_index),
                )
            )
        for k in range(2):
            seq = n_ok + 1 + k
            yx = ring_point(0.9 + 2.1 * k + 1.3 * s_index)
            score = threshold + 0.4 + 0.3 * k
            ts = now - 120 + 30 * k
            out.append(
                inspection(
                    station, seq, "NOK", score, threshold, yx, decision_ts=ts, bundle=station_bundle(s_index)
                )
            )
    return out


@contextlib.contextmanager
def serve_in_thread(app: Any, timeout_s: float = 10.0) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 (OS-chosen port) in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


def http_get(url: str, timeout_s: float = 10.0) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers.get("Content-Type", ""), err.read()


def station_events(stations: tuple[str, ...] = ("press-01", "press-02")) -> list[StationEvent]:
    """What stations report around an update: bundle loads, one failed update, a source that ended."""
    now = time.time()
    out = []
    for i, station in enumerate(stations):
        out.append(_event(station, now - 600 + i, "bundle_loaded", {"slot": "A"}, station_bundle(i)))
    failed = {"reason": "signature mismatch", "to": "1.2.0"}
    out.append(_event(stations[-1], now - 300, "update_failed", failed, station_bundle(len(stations) - 1)))
    out.append(_event(stations[0], now - 90, "source_ended", {"source": "folder"}, station_bundle(0)))
    return out


def _event(
    station: str, ts: float, kind: str, detail: dict[str, str], bundle: tuple[str, str]
) -> StationEvent:
    return StationEvent(
        station_id=station,
        epoch=1,
        event_id=uuid.uuid4().hex,
        ts=ts,
        kind=kind,
        bundle_id=bundle[0],
        bundle_version=bundle[1],
        detail=detail,
    )
