"""capture -> preprocess -> features -> score -> decide: five threads joined by bounded queues.

The model stages are `StationModel.prepare`, `.features` and `.score_features`, i.e. exactly `score_raw`
(the path the trainer evaluates bundles with) split in three so consecutive frames overlap (numpy,
Pillow, Open3D and ONNX Runtime release the GIL in their heavy parts). The model is read from the
`ModelSlot` once per frame, in the preprocess stage, and that snapshot travels with the frame, so a swap
never mixes two models.

Backpressure: only the capture queue has a policy, and only for a live source (`source.live`: a camera,
a paced replay). `drop_oldest` (default) keeps capture running and discards the oldest waiting frame when
scoring falls behind (counted as dropped{where="capture"}); `block` makes capture wait (a camera driver
then buffers or drops on its own side). A non-live source (a recording replayed as fast as possible)
always waits: nothing is dropped. The queues after it
always block: work already preprocessed is never thrown away.

Any exception in a stage becomes that frame's ERROR result (reason + file) and the loop goes on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from core.errors import InputError
from core.model import FrameScores
from edge.decision import ResultOptions, error_result, scored_result
from edge.metrics import StationMetrics
from edge.model_slot import ModelSlot, SlotState, manifest_threshold
from edge.sources import Frame
from protocol.messages import InspectionResult

__all__ = ["Backpressure", "BoundedQueue", "Pipeline", "PipelineConfig", "Scored"]

log = logging.getLogger("m3dm.edge.pipeline")

Backpressure = Literal["drop_oldest", "block"]
_END = object()  # end-of-stream marker, passed down every queue


class BoundedQueue:
    """A FIFO of at most `maxsize` items; put() either blocks or drops the oldest item (returned)."""

    def __init__(self, maxsize: int, policy: Backpressure = "block") -> None:
        if maxsize < 1:
            raise ValueError("queue size must be >= 1")
        self.maxsize, self.policy = maxsize, policy
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()

    def put(self, item: Any, force: bool = False) -> Any | None:
        """Add item; returns a dropped item (drop_oldest, queue full) or None. force: never drop/block."""
        with self._cond:
            dropped = None
            if not force:
                if self.policy == "drop_oldest":
                    if len(self._items) >= self.maxsize:
                        dropped = self._items.popleft()
                else:
                    while len(self._items) >= self.maxsize:
                        self._cond.wait()
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def get(self) -> Any:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class PipelineConfig:
    queue_size: int = 4
    backpressure: Backpressure = "drop_oldest"
    max_fps: float = 0.0  # 0 = as fast as the source gives frames


@dataclass
class Work:
    """One frame on its way through the stages."""

    frame: Frame
    state: SlotState | None = None
    data: Any = None  # PreparedScan, then PatchFeatures, then FrameScores
    error: tuple[str, str] | None = None  # (reason, file)
    latency_ms: dict[str, float] = field(default_factory=dict)
    shadow: tuple[SlotState, FrameScores | None, str | None] | None = None


@dataclass(frozen=True)
class Scored:
    """What the pipeline hands to its emitter: one result and its blobs."""

    result: InspectionResult
    blobs: list[bytes]


def _reason(err: BaseException) -> str:
    """The error message without the file prefix InputError adds (the file travels separately)."""
    if not isinstance(err, InputError):
        return f"{type(err).__name__}: {err}"
    text = str(err)
    prefix = f"{err.path}: " if err.path else ""
    return f"{type(err).__name__}: {text[len(prefix) :] if prefix and text.startswith(prefix) else text}"


def _error_of(err: BaseException, frame: Frame) -> tuple[str, str]:
    path = err.path if isinstance(err, InputError) and err.path else frame.source_file
    return _reason(err), path


def _run_prepare(work: Work) -> Any:
    return work.state.model.prepare(work.frame.raw)


def _run_features(work: Work) -> Any:
    return work.state.model.features(work.data)


def _run_score(work: Work) -> Any:
    scores = work.state.model.score_features(work.data)
    score = scores.image[work.state.variant]
    if not math.isfinite(score):
        raise ValueError(f"non-finite {work.state.variant} image score {score}")
    return scores


# (stage name, step) in order; a step maps work.data to the next work.data or raises.
MODEL_STAGES: tuple[tuple[str, Callable[[Work], Any]], ...] = (
    ("preprocess", _run_prepare),
    ("features", _run_features),
    ("score", _run_score),
)


class Pipeline:
    """Runs frames from `source` through the slot's model; calls `emit(Scored)` for every result.

    `emit` runs on the decide thread: it must hand the result over quickly (the uplink and the decision
    sinks queue internally).
    """

    def __init__(
        self,
        source: Iterable[Frame],
        slot: ModelSlot,
        emit: Callable[[Scored], None],
        metrics: StationMetrics,
        result_opts: ResultOptions,
        cfg: PipelineConfig = PipelineConfig(),
    ) -> None:
        self.source, self.slot, self.emit, self.metrics = source, slot, emit, metrics
        self.opts, self.cfg = result_opts, cfg
        # queue i feeds stage i: capture -> q0 -> preprocess -> q1 -> features -> q2 -> score -> q3 -> decide
        live = bool(getattr(source, "live", True))
        self.queues = [BoundedQueue(cfg.queue_size, cfg.backpressure if live else "block")]
        self.queues += [BoundedQueue(2) for _ in MODEL_STAGES]
        for (name, _), q in zip((("capture", None), *MODEL_STAGES), self.queues, strict=True):
            metrics.watch_queue(f"after_{name}", q.__len__)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ok_count = 0
        self._frame_count = 0
        self.finished = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        targets = [("capture", self._capture)]
        targets += [(name, self._stage_loop(i, name, step)) for i, (name, step) in enumerate(MODEL_STAGES)]
        targets.append(("decide", self._decide))
        for name, target in targets:
            thread = threading.Thread(target=self._guard(name, target), name=f"m3dm-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop capturing; frames already captured are still scored and emitted."""
        self._stop.set()
        stop = getattr(self.source, "stop", None)
        if stop is not None:
            stop()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait until the last result was emitted; True when finished in time."""
        return self.finished.wait(timeout_s)

    def _guard(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception:  # a bug in a stage loop: log loudly and end the stream rather than hang
                log.exception("pipeline stage %s crashed; ending the stream", name)
                self.stop()
                self.finished.set()

        return run

    # -- stages ----------------------------------------------------------------------------------------
    def _capture(self) -> None:
        period_s = 1.0 / self.cfg.max_fps if self.cfg.max_fps > 0 else 0.0
        next_s = time.monotonic()
        iterator = iter(self.source)
        while not self._stop.is_set():
            try:
                frame = next(iterator)
            except StopIteration:
                break
            except Exception as err:  # a source plug-in failing between frames: report, keep trying
                log.error("source failed: %s", err)
                if self._stop.wait(0.5):
                    break
                continue
            dropped = self.queues[0].put(Work(frame, latency_ms={"capture": frame.read_ms}))
            if dropped is not None:
                self.metrics.drop("capture")
                log.warning("scoring behind: dropped frame %s (drop_oldest)", dropped.frame.frame_id)
            if period_s:
                next_s = max(next_s + period_s, time.monotonic())
                if self._stop.wait(max(0.0, next_s - time.monotonic())):
                    break
        self.queues[0].put(_END, force=True)

    def _stage_loop(self, index: int, name: str, step: Callable[[Work], Any]) -> Callable[[], None]:
        q_in, q_out = self.queues[index], self.queues[index + 1]

        def loop() -> None:
            while (work := q_in.get()) is not _END:
                if index == 0:
                    self._admit(work)
                if work.error is None:
                    start = time.perf_counter()
                    try:
                        work.data = step(work)
                    except Exception as err:  # bad scan, runner failure, shape error: this frame's ERROR
                        work.error, work.data = _error_of(err, work.frame), None
                    work.latency_ms[name] = (time.perf_counter() - start) * 1e3
                q_out.put(work)
            q_out.put(_END)

        return loop

    def _admit(self, work: Work) -> None:
        """First model stage: take the slot snapshot (once per frame); carry a capture error along."""
        work.state = self.slot.current()
        if work.frame.error is not None:
            work.error = _error_of(work.frame.error, work.frame)

    def _decide(self) -> None:
        while (work := self.queues[-1].get()) is not _END:
            try:
                self._emit(work)  # the line's decision first; shadow scoring must not delay it
                self._maybe_shadow(work)
                if work.shadow is not None:
                    self._emit_shadow(work)
            except Exception:  # building or emitting one result failed: log it, keep the line running
                log.exception("frame %s: could not build or hand over its result", work.frame.frame_id)
        self.finished.set()

    def _with_map(self, work: Work) -> bool:
        """The 1-in-n OK sample that also carries its anomaly map."""
        state = work.state
        if work.data.image[state.variant] > state.threshold:
            return False  # NOK: always carries the map anyway
        self._ok_count += 1
        n = state.policy.map_every_n_ok
        return n > 0 and self._ok_count % n == 0

    def _emit(self, work: Work) -> None:
        start = time.perf_counter()
        frame, state, lat = work.frame, work.state, work.latency_ms
        scored = None
        if work.error is None:
            try:
                with_map = self._with_map(work)
                lat["decide"] = (time.perf_counter() - start) * 1e3
                lat["total"] = (time.time() - frame.capture_ts) * 1e3
                scored = Scored(*scored_result(frame, state, work.data, dict(lat), self.opts, with_map))
            except Exception as err:
                work.error = _error_of(err, frame)
        if scored is None:
            lat["decide"] = (time.perf_counter() - start) * 1e3
            lat["total"] = (time.time() - frame.capture_ts) * 1e3
            reason, path = work.error
            log.warning("frame %s: ERROR %s (%s)", frame.frame_id, reason, path)
            scored = Scored(error_result(frame, state, reason, path, dict(lat), self.opts), [])
        self.metrics.record(scored.result.decision, scored.result.latency_ms)
        self.emit(scored)

    def _maybe_shadow(self, work: Work) -> None:
        """Score 1 in n frames also with the shadow model (same raw scan, its own preprocessing).

        Runs on the decide thread after the active model's result went out, so the shadow never delays
        a decision (only, when sampled often, the next ones); its results carry shadow=True and never
        drive the reject gate.
        """
        state = work.state
        self._frame_count += 1
        if state.shadow is None or work.frame.raw is None or self._frame_count % state.shadow_every_n:
            return
        shadow_state = SlotState(
            state.shadow, state.policy, manifest_threshold(state.shadow, state.variant), 0
        )
        try:
            work.shadow = (shadow_state, state.shadow.score_raw(work.frame.raw), None)
        except Exception as err:
            work.shadow = (shadow_state, None, _reason(err))

    def _emit_shadow(self, work: Work) -> None:
        shadow_state, scores, reason = work.shadow
        if scores is None:
            result = error_result(
                work.frame, shadow_state, reason or "", work.frame.source_file, {}, self.opts
            )
            self.emit(Scored(msgspec.structs.replace(result, shadow=True), []))
            return
        result, blobs = scored_result(work.frame, shadow_state, scores, {}, self.opts, True, shadow=True)
        self.emit(Scored(result, blobs))
