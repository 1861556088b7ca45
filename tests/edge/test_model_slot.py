"""ModelSlot: atomic swaps between frames, runtime policy versions, shadow sampling settings."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from core.errors import ConfigError
from edge.model_slot import ModelSlot, Policy


def fake_model(version: str, threshold: float, variant: str = "rgb+point+fusion") -> SimpleNamespace:
    thresholds = SimpleNamespace(variant=variant, image_threshold=threshold)
    return SimpleNamespace(
        manifest=SimpleNamespace(version=version, bundle_id=version * 4, thresholds=thresholds)
    )


def test_swap_returns_old_and_takes_new_bundle_threshold() -> None:
    a, b = fake_model("1", 0.5), fake_model("2", 0.9)
    slot = ModelSlot(a)
    assert slot.current().model is a and slot.current().threshold == 0.5
    assert slot.swap(b) is a
    state = slot.current()
    assert state.model is b and state.threshold == 0.9 and state.threshold_version == 0


def test_runtime_threshold_is_versioned_and_reset_by_swap_unless_kept() -> None:
    slot = ModelSlot(fake_model("1", 0.5), Policy(map_every_n_ok=3))
    slot.set_policy(threshold=0.7, version=4)
    state = slot.current()
    assert (state.threshold, state.threshold_version, state.policy.map_every_n_ok) == (0.7, 4, 3)
    with pytest.raises(ConfigError, match="not newer"):
        slot.set_policy(threshold=0.8, version=4)
    with pytest.raises(ConfigError, match="needs a policy version"):
        slot.set_policy(threshold=0.8)
    assert slot.current().threshold == 0.7  # a refused change changes nothing
    slot.swap(fake_model("2", 0.9), keep_runtime_threshold=True)
    assert (slot.current().threshold, slot.current().threshold_version) == (0.7, 4)
    slot.swap(fake_model("3", 0.2))
    assert (slot.current().threshold, slot.current().threshold_version) == (0.2, 0)


def test_variant_without_threshold_is_refused_up_front() -> None:
    with pytest.raises(ConfigError, match="threshold for 'rgb\\+point\\+fusion', not 'rgb'"):
        ModelSlot(fake_model("1", 0.5), Policy(variant="rgb"))
    slot = ModelSlot(fake_model("1", 0.5), Policy(variant="rgb+point+fusion"))
    with pytest.raises(ConfigError, match="has a threshold for 'point', not 'rgb\\+point\\+fusion'"):
        slot.swap(fake_model("2", 0.5, variant="point"))
    assert slot.current().model.manifest.version == "1"
    # a runtime threshold makes any variant usable
    slot.set_policy(threshold=1.5, variant="rgb", version=1)
    assert slot.current().variant == "rgb" and slot.current().threshold == 1.5


def test_an_unpinned_policy_decides_on_each_bundles_own_variant() -> None:
    slot = ModelSlot(fake_model("1", 0.5, variant="rgb"))
    assert (slot.current().variant, slot.current().threshold) == ("rgb", 0.5)
    slot.swap(fake_model("2", 0.8))  # an update to a full bundle decides on its fused variant
    assert (slot.current().variant, slot.current().threshold) == ("rgb+point+fusion", 0.8)
    with pytest.raises(ConfigError, match="unknown variant 'rgb\\+depth'"):
        ModelSlot(fake_model("3", 0.5, variant="rgb+depth"))


def test_shadow_and_listeners() -> None:
    slot = ModelSlot(fake_model("1", 0.5))
    seen = []
    slot.add_listener(lambda old, new: seen.append((old.shadow, new.shadow_every_n)))
    shadow = fake_model("2", 0.6)
    slot.set_shadow(shadow, sample_every_n=5)
    assert slot.current().shadow is shadow and slot.current().shadow_every_n == 5
    with pytest.raises(ConfigError, match="sample_every_n must be >= 1"):
        slot.set_shadow(shadow, sample_every_n=0)
    slot.set_shadow(None)
    assert slot.current().shadow is None and seen == [(None, 5), (shadow, 0)]


def test_concurrent_swaps_never_show_a_mixed_state() -> None:
    models = [fake_model(str(i), float(i)) for i in range(4)]
    slot = ModelSlot(models[0])
    stop = threading.Event()
    bad = []

    def reader() -> None:
        while not stop.is_set():
            state = slot.current()
            if state.threshold != float(state.model.manifest.version):
                bad.append(state)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(2000):
            slot.swap(models[i % 4])
    finally:
        stop.set()
        thread.join(5)
    assert bad == []
