"""The station's active model, swappable between frames, with an optional shadow and a runtime policy.

The pipeline reads `slot.current()` ONCE per frame and keeps that snapshot for every stage of the frame,
so a swap mid-stream never mixes two models in one result. Everything a frame needs is in one frozen
`SlotState`, replaced whole under a lock: a reader never sees a half-made change.

Deploy hooks:
  slot.swap(new_model)                     -> the previous StationModel (the caller closes/keeps it)
  slot.set_shadow(model, sample_every_n)   score 1 in n frames also with `model`; results have shadow=True
  slot.set_shadow(None)                    stop shadow scoring
  slot.set_policy(threshold=, variant=, version=, map_every_n_ok=)   runtime decision policy
  slot.add_listener(fn)                    fn(old_state, new_state) after each change (events, metrics)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from core.errors import ConfigError
from core.model import VARIANTS

__all__ = ["DEFAULT_VARIANT", "effective_variant", "Policy", "SlotState", "ModelSlot", "manifest_threshold"]

DEFAULT_VARIANT = "rgb+point+fusion"


@dataclass(frozen=True)
class Policy:
    """How scores become decisions. threshold None = the bundle's own threshold (threshold_version 0).

    variant: None = the bundle's own decision variant (its manifest's thresholds.variant), so an RGB-only
    bundle decides on 'rgb' and a full one on its fused variant without the operator naming it.

    version: the runtime policy version that set `threshold` (carried in results as threshold_version).
    map_every_n_ok: attach the anomaly map to 1 in n OK results (0 = never; NOK results always carry it).
    """

    variant: str | None = None
    threshold: float | None = None
    version: int = 0
    map_every_n_ok: int = 10


@dataclass(frozen=True)
class SlotState:
    """One consistent view: the model, its decision threshold, the shadow model (if any)."""

    model: Any  # edge.station_model.StationModel
    policy: Policy
    threshold: float
    threshold_version: int
    shadow: Any | None = None
    shadow_every_n: int = 0

    @property
    def variant(self) -> str:
        return effective_variant(self.model, self.policy)


def effective_variant(model: Any, policy: Policy) -> str:
    """The variant that decides: the policy's, else the bundle's own."""
    return policy.variant if policy.variant is not None else str(model.manifest.thresholds.variant)


def manifest_threshold(model: Any, variant: str) -> float:
    """The bundle's image threshold for `variant`; ConfigError if the bundle has none for it."""
    thr = model.manifest.thresholds
    if thr.variant != variant:
        raise ConfigError(
            f"bundle {model.manifest.version} has a threshold for {thr.variant!r}, not {variant!r}; "
            f"use --variant {thr.variant!r} or set a runtime threshold"
        )
    return float(thr.image_threshold)


def _resolve(model: Any, policy: Policy) -> tuple[float, int]:
    variant = effective_variant(model, policy)
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if policy.map_every_n_ok < 0:
        raise ConfigError("map_every_n_ok must be >= 0")
    if policy.threshold is not None:
        return float(policy.threshold), policy.version
    return manifest_threshold(model, variant), 0


class ModelSlot:
    """Thread-safe holder of the active StationModel (and shadow), read once per frame."""

    def __init__(self, model: Any, policy: Policy | None = None) -> None:
        policy = policy or Policy()
        threshold, version = _resolve(model, policy)
        self._lock = threading.Lock()
        self._state = SlotState(model, policy, threshold, version)
        self._listeners: list[Callable[[SlotState, SlotState], None]] = []

    def current(self) -> SlotState:
        """The snapshot one frame uses from start to end."""
        return self._state  # one attribute read: atomic; states are immutable

    def add_listener(self, fn: Callable[[SlotState, SlotState], None]) -> None:
        self._listeners.append(fn)

    def _set(self, make: Callable[[SlotState], SlotState]) -> SlotState:
        with self._lock:
            old = self._state
            new = make(old)
            self._state = new
        for fn in self._listeners:
            fn(old, new)
        return old

    def swap(self, new_model: Any, keep_runtime_threshold: bool = False) -> Any:
        """Make `new_model` active from the next frame on; returns the previous model.

        A runtime threshold was tuned for the old model, so by default the new bundle's own threshold
        applies (threshold_version 0); keep_runtime_threshold=True carries the runtime one over.
        Raises ConfigError (and changes nothing) when the new bundle has no threshold for the variant.
        """

        def make(old: SlotState) -> SlotState:
            policy = old.policy if keep_runtime_threshold else replace(old.policy, threshold=None, version=0)
            threshold, version = _resolve(new_model, policy)
            return replace(
                old, model=new_model, policy=policy, threshold=threshold, threshold_version=version
            )

        return self._set(make).model

    def set_shadow(self, model: Any | None, sample_every_n: int = 1) -> None:
        """Also score 1 in `sample_every_n` frames with `model` (results flagged shadow=True); None stops."""
        if model is not None and sample_every_n < 1:
            raise ConfigError("shadow sample_every_n must be >= 1")
        if model is not None:
            manifest_threshold(model, self._state.variant)  # fail now, not on a frame
        n = sample_every_n if model is not None else 0
        self._set(lambda old: replace(old, shadow=model, shadow_every_n=n))

    def set_policy(
        self,
        threshold: float | None = None,
        variant: str | None = None,
        version: int | None = None,
        map_every_n_ok: int | None = None,
    ) -> Policy:
        """Change the decision policy from the next frame on; None leaves a field as it is.

        A threshold needs a version (> 0, larger than the current one) so results say which policy
        decided them; passing version alone with threshold=None returns to the bundle's threshold.
        """

        def make(old: SlotState) -> SlotState:
            p = old.policy
            if version is not None and version <= p.version:
                raise ConfigError(f"policy version {version} is not newer than {p.version}")
            if threshold is not None and version is None:
                raise ConfigError("a runtime threshold needs a policy version")
            policy = Policy(
                variant=p.variant if variant is None else variant,
                threshold=threshold if version is not None else p.threshold,
                version=p.version if version is None else version,
                map_every_n_ok=p.map_every_n_ok if map_every_n_ok is None else map_every_n_ok,
            )
            thr, thr_version = _resolve(old.model, policy)
            return replace(old, policy=policy, threshold=thr, threshold_version=thr_version)

        self._set(make)
        return self._state.policy
