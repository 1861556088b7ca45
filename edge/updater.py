"""Station side of deploy: check in with the registry, converge on its desired state, swap between frames.

    updater = Updater(cfg, station_id, slot, epoch, events=uplink.event, status=uplink.set_status).start()

Every `checkin_s` the station sends a CheckIn (what it runs) and gets a CheckInReply (what it should run):
  bundle offer   download (chunked, resumable, sha256 per chunk and per file) -> verify the tar before
                 unpacking (signature against the trusted key, every member's sha256, expiry, anti-rollback
                 counter) -> unpack into `staging/` (traversal-safe) -> verify the folder again -> load the
                 runners -> replay the golden samples -> only then `ModelSlot.swap` between two frames.
                 The old bundle scores every frame until the swap; the pipeline reads the slot once per
                 frame, so no frame is dropped and none sees a half-loaded model.
                 The replaced bundle is kept, on disk and loaded in memory (rollback = an offer of the
                 previous bundle: no download, no reload, swapped back at once);
                 `active.json` (atomic rename) makes the active bundle survive a restart.
  policy         runtime threshold / map sampling: `ModelSlot.set_policy` (versions only grow)
  shadow         a candidate bundle, fetched and checked the same way, scored on 1 in n frames beside the
                 active one (`ModelSlot.set_shadow`); clear_shadow stops it
While `STATE_DIR/updates.lock` exists (`m3dm edge lock`) an offer is downloaded and verified but not applied,
and reported as deferred. Every outcome goes to the registry (UpdateReport, retried until acked) and to the
collector as a StationEvent (`events(kind, detail)`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from core.errors import M3DMError
from edge.bundle import safe_extract, verify_bundle
from edge.bundle_fetch import DownloadError, download_bundle
from edge.bundle_precheck import verify_tar
from edge.registry_client import RegistryClient, RegistryRefusedError, RegistryUnavailableError
from edge.station_model import replay_golden, station_model_from_manifest
from edge.update_lock import is_locked
from edge.update_state import BundleRef, UpdateState, load_state, save_state
from edge.updater_config import UpdaterConfig
from protocol.deploy_messages import (
    BundleOffer,
    CheckIn,
    CheckInReply,
    Chunk,
    ChunkRequest,
    DeployAck,
    PolicySpec,
    ShadowSpec,
    UpdateReport,
)
from protocol.errors import BundleError

__all__ = ["UpdateFailedError", "Updater", "UpdaterConfig", "start_for_station", "startup_bundle"]

log = logging.getLogger("m3dm.updater")


class UpdateFailedError(Exception):
    """An update step failed; `check` names it (download, signature, hashes, golden, load, ...)."""

    def __init__(self, check: str, reason: str) -> None:
        self.check, self.reason = check, reason
        super().__init__(f"[{check}] {reason}")


def startup_bundle(state_dir: Path) -> Path | None:
    """The bundle folder `active.json` names, if it still exists: what a restarted station loads."""
    active = load_state(Path(state_dir)).active
    if active is not None and Path(active.path).is_dir():
        return Path(active.path)
    return None


def _public(key: Path) -> Path:
    return key / "bundle_signing.pub" if key.is_dir() else key


def _ref_of(model: Any) -> BundleRef:
    m = model.manifest
    return BundleRef(m.bundle_id, m.version, str(model.root), int(m.anti_rollback_counter))


class Updater:
    def __init__(
        self,
        cfg: UpdaterConfig,
        station_id: str,
        slot: Any,
        epoch: int = 0,
        events: Callable[[str, Mapping[str, str]], Any] | None = None,
        status: Callable[..., Any] | None = None,
        health: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.station_id = station_id
        self.slot = slot
        self.epoch = epoch
        self.events = events
        self.status = status
        self.health = health
        self.dirs = {name: Path(cfg.state_dir) / name for name in ("bundles", "staging", "downloads")}
        self.client = RegistryClient(cfg.registry, cfg.curve_dir, cfg.registry_key, cfg.request_timeout_s)
        self.state = self._initial_state()
        self.shadow_ref: BundleRef | None = None
        self.checkin_s = cfg.checkin_s
        self._failed: dict[str, str] = {}
        self._deferred: set[str] = set()
        self._reports: list[UpdateReport] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self.last_timings_ms: dict[str, float] = {}
        self._previous_model: Any = None  # the model the last swap replaced: rollback without reloading

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> Updater:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.client.close()

    def _initial_state(self) -> UpdateState:
        """active.json if it names the running bundle, else adopt the running one (copied into bundles/)."""
        state = load_state(self.cfg.state_dir)
        model = self.slot.current().model
        if state.active is not None and state.active.bundle_id == model.manifest.bundle_id:
            return state
        kept = self.dirs["bundles"] / model.manifest.bundle_id
        if not kept.is_dir():
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp = kept.with_name(f".{kept.name}.copy")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(model.root, tmp)
            tmp.rename(kept)
        ref = BundleRef(
            model.manifest.bundle_id, model.manifest.version, str(kept), model.manifest.anti_rollback_counter
        )
        previous = (
            state.active if state.active is not None and Path(state.active.path).is_dir() else state.previous
        )
        state = UpdateState(
            ref, previous if previous is None or previous.bundle_id != ref.bundle_id else None
        )
        save_state(self.cfg.state_dir, state)
        return state

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.checkin_once()
            except RegistryUnavailableError as err:
                log.warning("station %s: %s", self.station_id, err)
            except RegistryRefusedError as err:
                log.error("station %s: %s", self.station_id, err)
            except Exception:  # the updater must never take the station down with it
                log.exception("station %s: updater step failed", self.station_id)
            self._stop.wait(self.checkin_s)

    # ------------------------------------------------------------------------------------------ one round

    def checkin_once(self) -> CheckInReply:
        self._flush_reports()
        reply, _ = self.client.request(self._checkin(), CheckInReply)
        if reply.checkin_s > 0:
            self.checkin_s = reply.checkin_s
        if reply.policy is not None:
            self._apply_policy(reply.policy)
        if reply.clear_shadow and self.shadow_ref is not None:
            self.slot.set_shadow(None)
            self._event("shadow_stopped", {"bundle_id": self.shadow_ref.bundle_id})
            self.shadow_ref = None
        if reply.shadow is not None:
            self._apply_shadow(reply.shadow)
        if reply.bundle is not None:
            self._apply_offer(reply.bundle, reply.rollout_id)
        return reply

    def _checkin(self) -> CheckIn:
        active, previous = self.state.active, self.state.previous
        state = self.slot.current()
        return CheckIn(
            station_id=self.station_id,
            epoch=self.epoch,
            ts=time.time(),
            tags=tuple(self.cfg.tags),
            active_bundle_id=active.bundle_id if active else "",
            active_version=active.version if active else "",
            previous_bundle_id=previous.bundle_id if previous else "",
            previous_version=previous.version if previous else "",
            policy_version=int(state.policy.version),
            shadow_bundle_id=self.shadow_ref.bundle_id if self.shadow_ref else "",
            locked=is_locked(self.cfg.state_dir),
            health=self._health(),
        )

    def _health(self) -> dict[str, float]:
        if self.health is None:
            return {}
        try:
            return {k: float(v) for k, v in self.health().items()}
        except Exception as err:  # a health probe must not stop check-ins
            log.warning("station %s: health probe failed: %s", self.station_id, err)
            return {}

    def _flush_reports(self) -> None:
        while self._reports:
            self.client.request(self._reports[0], DeployAck)
            self._reports.pop(0)

    def _report(
        self,
        offer: BundleOffer,
        outcome: str,
        rollout_id: str,
        check: str = "",
        reason: str = "",
        timings: Mapping[str, float] | None = None,
    ) -> None:
        active = self.state.active
        self._reports.append(
            UpdateReport(
                station_id=self.station_id,
                epoch=self.epoch,
                ts=time.time(),
                bundle_id=offer.bundle_id,
                version=offer.version,
                outcome=outcome,
                check=check,
                reason=reason,
                rollout_id=rollout_id,
                active_bundle_id=active.bundle_id if active else "",
                timings_ms=dict(timings or {}),
            )
        )
        try:
            self._flush_reports()
        except (RegistryUnavailableError, RegistryRefusedError) as err:
            log.warning(
                "station %s: report of %s kept for the next check-in: %s", self.station_id, outcome, err
            )

    def _event(self, kind: str, detail: Mapping[str, Any]) -> None:
        if self.events is not None:
            try:
                self.events(kind, {k: str(v) for k, v in detail.items()})
            except Exception as err:  # an event sink problem must not fail an update
                log.warning("station %s: event %s not queued: %s", self.station_id, kind, err)

    # ------------------------------------------------------------------------------------------ policy

    def _apply_policy(self, spec: PolicySpec) -> None:
        current = self.slot.current().policy.version
        if spec.version <= current:
            return
        try:
            self.slot.set_policy(
                threshold=spec.threshold,
                variant=spec.variant,
                version=spec.version,
                map_every_n_ok=spec.map_every_n_ok,
            )
        except M3DMError as err:
            log.error("station %s: policy v%d refused: %s", self.station_id, spec.version, err)
            self._event("policy_failed", {"version": spec.version, "reason": str(err)})
            return
        log.info(
            "station %s: policy v%d active (threshold %s)", self.station_id, spec.version, spec.threshold
        )
        self._event(
            "policy_applied", {"version": spec.version, "threshold": spec.threshold, "variant": spec.variant}
        )

    # ------------------------------------------------------------------------------------------ bundles

    def _fetch_chunk(self, offer: BundleOffer) -> Callable[[int], bytes]:
        def fetch(index: int) -> bytes:
            request = ChunkRequest(station_id=self.station_id, bundle_id=offer.bundle_id, index=index)
            reply, blobs = self.client.request(request, Chunk)
            if reply.bundle_id != offer.bundle_id or reply.index != index or not blobs:
                raise UpdateFailedError("download", f"registry sent chunk {reply.index} of {reply.bundle_id}")
            return blobs[0]

        return fetch

    def _kept_dir(self, bundle_id: str) -> Path | None:
        for ref in (self.state.active, self.state.previous, self.shadow_ref):
            if ref is not None and ref.bundle_id == bundle_id and Path(ref.path).is_dir():
                return Path(ref.path)
        return None

    def _prepare(self, offer: BundleOffer, timings: dict[str, float]) -> Any:
        """Download, verify, unpack, load, golden-replay; returns the loaded StationModel (not yet active)."""
        previous = self._previous_model
        if previous is not None and previous.manifest.bundle_id == offer.bundle_id:
            # a rollback: the model that scored until the last swap is still loaded; going back is instant
            timings["from_memory"] = 1.0
            return previous
        public = _public(Path(self.cfg.signing_key))
        min_counter = self.state.min_counter()
        root = self._kept_dir(offer.bundle_id)
        t = time.perf_counter()
        if root is None and offer.size_bytes == 0:
            raise UpdateFailedError("download", "bundle is neither in the registry's store nor kept here")
        if root is None:
            try:
                tar, _ = download_bundle(offer, self.dirs["downloads"], self._fetch_chunk(offer))
            except (DownloadError, RegistryRefusedError) as err:
                raise UpdateFailedError("download", str(err)) from None
            # RegistryUnavailableError propagates: not a verdict on the bundle; the next check-in resumes
            timings["download_ms"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            verify_tar(tar, public, min_counter)  # BundleError: nothing unpacked
            timings["verify_ms"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            root = self.dirs["staging"] / offer.bundle_id
            shutil.rmtree(root, ignore_errors=True)
            safe_extract(tar, root)
            timings["extract_ms"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
        manifest = verify_bundle(root, public, min_counter=min_counter)
        if manifest.bundle_id != offer.bundle_id:
            raise UpdateFailedError(
                "offer", f"archive holds bundle {manifest.bundle_id}, offer says {offer.bundle_id}"
            )
        timings["verify_dir_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        try:
            model = station_model_from_manifest(
                root, manifest, self.cfg.backend, precision=self.cfg.precision
            )
        except (M3DMError, OSError, RuntimeError, ValueError) as err:
            raise UpdateFailedError("load", f"{type(err).__name__}: {err}") from None
        timings["load_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        results = replay_golden(model)
        timings["golden_ms"] = (time.perf_counter() - t) * 1e3
        bad = [r for r in results if not r.ok]
        if not results or bad:
            detail = (
                "no golden samples"
                if not results
                else ", ".join(
                    f"{r.input_path}: {r.actual:.6g} vs expected {r.expected:.6g}" for r in bad[:3]
                )
            )
            raise UpdateFailedError("golden", f"{len(bad)} of {len(results)} golden samples off: {detail}")
        return model

    def _settle(self, model: Any) -> Any:
        """Move a staged bundle into bundles/ (the model keeps working: runners and banks are in memory)."""
        root = Path(model.root)
        if root.parent == self.dirs["staging"]:
            kept = self.dirs["bundles"] / root.name
            shutil.rmtree(kept, ignore_errors=True)
            kept.parent.mkdir(parents=True, exist_ok=True)
            root.rename(kept)
            model.root = kept
            (self.dirs["downloads"] / f"{root.name}.tar").unlink(missing_ok=True)
        return model

    def _fail(
        self, offer: BundleOffer, rollout_id: str, err: UpdateFailedError | BundleError, kind: str
    ) -> None:
        check = err.check
        reason = err.reason if isinstance(err, UpdateFailedError) else err.message
        shutil.rmtree(self.dirs["staging"] / offer.bundle_id, ignore_errors=True)
        self._failed[offer.bundle_id] = f"[{check}] {reason}"
        log.error(
            "station %s: bundle %s v%s refused: [%s] %s",
            self.station_id,
            offer.bundle_id[:8],
            offer.version,
            check,
            reason,
        )
        self._report(offer, "failed" if kind == "install" else "shadow_failed", rollout_id, check, reason)
        self._event(
            "update_failed" if kind == "install" else "shadow_failed",
            {"bundle_id": offer.bundle_id, "version": offer.version, "check": check, "reason": reason},
        )

    def _apply_offer(self, offer: BundleOffer, rollout_id: str) -> None:
        if self.state.active is not None and offer.bundle_id == self.state.active.bundle_id:
            return
        if offer.bundle_id in self._failed:
            return
        locked = is_locked(self.cfg.state_dir)
        if locked and offer.bundle_id in self._deferred:
            return
        t0 = time.perf_counter()
        rollback = self.state.previous is not None and offer.bundle_id == self.state.previous.bundle_id
        timings: dict[str, float] = {}
        self._event(
            "update_available",
            {"bundle_id": offer.bundle_id, "version": offer.version, "rollout": rollout_id},
        )
        try:
            model = self._prepare(offer, timings)
        except (UpdateFailedError, BundleError) as err:
            self._fail(offer, rollout_id, err, "install")
            return
        except RegistryUnavailableError as err:
            log.warning(
                "station %s: download of %s paused (%s); resuming at the next check-in",
                self.station_id,
                offer.bundle_id[:8],
                err,
            )
            return
        if is_locked(self.cfg.state_dir):
            self._deferred.add(offer.bundle_id)
            log.info(
                "station %s: bundle %s v%s ready but updates are locked",
                self.station_id,
                offer.bundle_id[:8],
                offer.version,
            )
            self._report(
                offer, "deferred", rollout_id, "lock", "updates locked on the station (m3dm edge lock)"
            )
            self._event("update_deferred", {"bundle_id": offer.bundle_id, "version": offer.version})
            return
        self._deferred.discard(offer.bundle_id)
        self._swap(offer, model, rollout_id, rollback, timings, t0)

    def _swap(
        self,
        offer: BundleOffer,
        model: Any,
        rollout_id: str,
        rollback: bool,
        timings: dict[str, float],
        t0: float,
    ) -> None:
        model = self._settle(model)
        t = time.perf_counter()
        try:
            self._previous_model = self.slot.swap(model)
        except M3DMError as err:
            self._fail(offer, rollout_id, UpdateFailedError("swap", str(err)), "install")
            return
        timings["swap_ms"] = (time.perf_counter() - t) * 1e3
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        old = self.state.active
        self.state = UpdateState(_ref_of(model), old)
        save_state(self.cfg.state_dir, self.state)
        self._prune()
        self.last_timings_ms = dict(timings)
        if self.status is not None:
            self.status(bundle_id=offer.bundle_id, bundle_version=offer.version)
        outcome = "rolled_back" if rollback else "installed"
        log.info(
            "station %s: bundle %s v%s active (%s) in %.0f ms (swap %.2f ms)",
            self.station_id,
            offer.bundle_id[:8],
            offer.version,
            outcome,
            timings["total_ms"],
            timings["swap_ms"],
        )
        self._report(offer, outcome, rollout_id, timings=timings)
        self._event(
            "bundle_" + outcome,
            {
                "bundle_id": offer.bundle_id,
                "version": offer.version,
                "previous": old.bundle_id if old else "",
                "total_ms": f"{timings['total_ms']:.1f}",
            },
        )

    def _prune(self) -> None:
        keep = {
            r.bundle_id for r in (self.state.active, self.state.previous, self.shadow_ref) if r is not None
        }
        for folder in (self.dirs["bundles"], self.dirs["staging"]):
            if folder.is_dir():
                for child in folder.iterdir():
                    if child.is_dir() and child.name not in keep:
                        shutil.rmtree(child, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ shadow

    def _apply_shadow(self, spec: ShadowSpec) -> None:
        offer = spec.offer
        if self.shadow_ref is not None and self.shadow_ref.bundle_id == offer.bundle_id:
            return
        if offer.bundle_id in self._failed:
            return
        timings: dict[str, float] = {}
        try:
            model = self._settle(self._prepare(offer, timings))
            self.slot.set_shadow(model, spec.sample_every_n)
        except (UpdateFailedError, BundleError) as err:
            self._fail(offer, "", err, "shadow")
            return
        except RegistryUnavailableError:
            return  # resumed at the next check-in
        except M3DMError as err:
            self._fail(offer, "", UpdateFailedError("shadow", str(err)), "shadow")
            return
        self.shadow_ref = _ref_of(model)
        log.info(
            "station %s: shadow bundle %s v%s on 1 in %d frames",
            self.station_id,
            offer.bundle_id[:8],
            offer.version,
            spec.sample_every_n,
        )
        self._report(offer, "shadow_loaded", "", timings=timings)
        self._event(
            "shadow_started",
            {"bundle_id": offer.bundle_id, "version": offer.version, "every_n": spec.sample_every_n},
        )


def start_for_station(station: Any) -> Updater | None:
    """The updater of an `edge.station.Station` whose config has an `[updater]` table (else None), started.

    Events go to the collector through the station's uplink (when it has one); the epoch is the outbox's.
    """
    cfg = station.cfg.updater
    if cfg is None:
        return None
    cfg = dataclasses.replace(
        cfg,
        curve_dir=cfg.curve_dir or station.cfg.curve_dir,
        signing_key=cfg.signing_key or station.cfg.key,
        precision=station.cfg.precision,  # a station told fp32 loads every offered bundle's fp32 graphs
    )
    if cfg.curve_dir is None or cfg.signing_key is None:
        raise UpdateFailedError("config", "the updater needs curve_dir and a bundle signing key")
    uplink = station.uplink
    epoch = int(getattr(getattr(uplink, "outbox", None), "epoch", 0) or 0)
    events = uplink.event if uplink is not None else None
    status = uplink.set_status if uplink is not None else None

    def health() -> dict[str, float]:
        return {"fps": station.metrics.fps(), "outbox_depth": float(station.results.depth())}

    return Updater(cfg, station.cfg.station_id, station.slot, epoch, events, status, health).start()
