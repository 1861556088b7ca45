"""The signed bundle manifest (`m3dm-bundle/1`): everything a station needs to score, beside the artifacts.

The trainer fills it from a model directory; `canonical_json` is the exact byte string that is signed and
written as `manifest.json`; a station parses it with `manifest_from_json` before trusting any file.
Every record is a frozen msgspec struct (unknown fields refused, validated in `__post_init__`), with
`to_dict()` / `from_dict()`; every error, whether msgspec's or ours, is a `protocol.errors.SchemaError`.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

import msgspec

from protocol.errors import SchemaError

__all__ = [
    "BANK_ENCODINGS",
    "MANIFEST_NAME",
    "NETWORK_NAMES",
    "IMAGE_SCORE_RULES",
    "INDEX_KINDS",
    "LOCAL_NORM_KEYS",
    "MODALITIES",
    "PRECISIONS",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "ArtifactRef",
    "BankSpec",
    "BundleManifest",
    "DLFCoefficients",
    "FeatureSpec",
    "GoldenSample",
    "InputSpec",
    "Provenance",
    "ScoringSpec",
    "Thresholds",
    "canonical_json",
    "check_relpath",
    "format_utc",
    "manifest_from_json",
    "new_bundle_id",
    "parse_utc",
]

SCHEMA_VERSION = "m3dm-bundle/1"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
BANK_ENCODINGS = ("fp32", "fp16", "int8", "pq")
PRECISIONS = ("fp32", "fp16", "int8")
INDEX_KINDS = ("ivf-flat", "hnsw")  # faiss ANN index files a bank may ship with
# How each bank's patch distances become its image score (core.config.IMAGE_RULES, core.scoring)
IMAGE_SCORE_RULES = ("max_patch", "max_blurred_map", "topk_mean", "local_norm")
LOCAL_NORM_KEYS = ("row", "position")
NETWORK_NAMES = ("rgb", "point", "uff")
# What a model was trained on: M3DM proper (rgb + point clouds), or RGB alone for a class without xyz files,
# which has the rgb bank only and scores the single "rgb" variant.
MODALITIES = (("rgb", "point"), ("rgb",))
ALL_VARIANTS = ("rgb", "point", "fusion", "rgb+point", "rgb+point+fusion")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_BUNDLE_ID = re.compile(r"[0-9a-f]{32}")
_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")


# ----------------------------------------------------------------------------------------- helpers


def new_bundle_id() -> str:
    """A fresh bundle id: uuid4 as 32 lowercase hex characters."""
    return uuid.uuid4().hex


def format_utc(moment: datetime) -> str:
    """ISO 8601 UTC with a `Z` suffix, whole seconds (`2026-01-31T12:00:00Z`)."""
    if moment.tzinfo is None:
        raise SchemaError("datetime must be timezone-aware")
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str) -> datetime:
    """Parse an ISO 8601 timestamp that carries a timezone; `Z` is accepted (Python 3.10 lacks it)."""
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except (TypeError, ValueError):
        raise SchemaError(f"not an ISO 8601 timestamp: {text!r}") from None
    if moment.tzinfo is None:
        raise SchemaError(f"timestamp has no timezone: {text!r}")
    return moment


def check_relpath(path: str) -> str:
    """Return `path` if it is a clean relative POSIX path inside a bundle, else raise SchemaError."""
    pure = PurePosixPath(path)
    bad = (
        not path
        or "\\" in path
        or "\x00" in path
        or pure.is_absolute()
        or str(pure) != path
        or any(part in ("..", ".") for part in pure.parts)
        or path in (MANIFEST_NAME, SIGNATURE_NAME)
    )
    if bad:
        raise SchemaError(f"bundle path must be relative, normalised, without '..', not reserved: {path!r}")
    return path


def _check_sha256(value: str, where: str) -> None:
    if not _SHA256.fullmatch(value):
        raise SchemaError(f"{where}: sha256 must be 64 lowercase hex characters, got {value!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SchemaError(message)


# ------------------------------------------------------------------------------- typed records


def _check_finite(value: Any, where: str) -> None:
    """NaN and infinities are not JSON: refuse them wherever a float sits (msgspec would write `null`)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SchemaError(f"{where}: must be finite, got {value!r}")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")


class _Record(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every manifest record: frozen, unknown fields refused, floats finite.

    To extend a record, add a field WITH a default after the existing ones (old manifests still parse) and,
    if it needs checking, a line in that record's `__post_init__` raising SchemaError. msgspec runs
    `__post_init__` on construction and on every decode, so a record that exists is a valid one.
    """

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field_name in self.__struct_fields__:
            value = getattr(self, field_name)
            if not isinstance(value, msgspec.Struct):  # nested records check themselves
                _check_finite(value, f"{name}.{field_name}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only: tuples become lists, records become objects."""
        return json.loads(_json_text(self))

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """Strict typed parse (msgspec): unknown or missing fields and wrong types raise SchemaError."""
        return _convert(data, cls)


def _convert(data: Any, cls: type) -> Any:
    try:
        return msgspec.convert(data, cls, strict=True)
    except msgspec.ValidationError as exc:  # the message names the field path, e.g. `$.banks[...].dim`
        raise SchemaError(f"{cls.__name__}: {exc}") from None


def _json_text(record: msgspec.Struct) -> str:
    """Sorted keys, no whitespace, ASCII, no NaN: stdlib json, so the signed bytes never change format."""
    try:
        builtins = msgspec.to_builtins(record)
        return json.dumps(builtins, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"manifest is not JSON-serialisable: {exc}") from None


# ---------------------------------------------------------------------------------------- records


class InputSpec(_Record):
    """Preprocessing a station must reproduce; field names match `core.config.PreprocessConfig`."""

    rgb_input_size: int
    image_size: int
    rgb_mean: tuple[float, float, float]
    rgb_std: tuple[float, float, float]
    border_px: int
    ransac_threshold_m: float
    ransac_n: int
    ransac_iterations: int
    plane_removal_m: float
    pad_multiple: int
    keep_largest_cluster: bool
    cluster_eps_m: float
    cluster_min_points: int
    seed: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.rgb_input_size > 0 and self.image_size > 0, "InputSpec: sizes must be positive")
        _require(all(s > 0 for s in self.rgb_std), "InputSpec: rgb_std must be positive")
        _require(
            0 < self.ransac_threshold_m < 1 and 0 < self.plane_removal_m < 1, "InputSpec: metres in (0,1)"
        )


class FeatureSpec(_Record):
    """Backbones and feature geometry: channel dims, patch grids and point grouping."""

    rgb_backbone: str
    point_backbone: str
    rgb_dim: int
    point_dim: int
    fusion_dim: int
    rgb_grid: int
    point_grid: int
    num_groups: int
    group_size: int

    def __post_init__(self) -> None:
        super().__post_init__()
        dims = (
            self.rgb_dim,
            self.point_dim,
            self.rgb_grid,
            self.point_grid,
            self.num_groups,
            self.group_size,
        )
        _require(all(d > 0 for d in dims), "FeatureSpec: dims, grids and group sizes must be positive")
        _require(
            self.fusion_dim == self.rgb_dim + self.point_dim, "FeatureSpec: fusion_dim != rgb+point dims"
        )


class ArtifactRef(_Record):
    """One network file. `sha256=""` and `size_bytes=0` mark a draft the bundle builder fills in."""

    path: str
    sha256: str = ""
    size_bytes: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_relpath(self.path)
        if self.sha256:
            _check_sha256(self.sha256, self.path)
        _require(self.size_bytes >= 0, f"{self.path}: size_bytes must be >= 0")


class BankSpec(_Record):
    """One memory bank file (rows x dim, encoded) and the scalar stats its features are mapped with."""

    path: str
    encoding: str
    rows: int
    dim: int
    grid: int  # side of the patch grid this bank's features live on (e.g. 28 for rgb, 56 for point)
    feat_mean: float = 0.0  # M3DM maps every feature as (v - mean) / std with global scalars
    feat_std: float = 1.0
    stats_path: str | None = None  # optional per-dimension stats (.npy) instead of the scalars
    pq_m: int | None = None  # PQ sub-quantisers; only for encoding "pq"
    # Optional faiss ANN index over the decoded rows (trainer/ann.py); absent: exact search.
    index_path: str | None = None
    index_kind: str | None = None  # one of INDEX_KINDS
    index_params: dict[str, int] | None = None  # search knob: {"nprobe": n} or {"ef_search": n}
    index_recall: float | None = None  # recall@1 vs exact on held-out normals when it was chosen
    # (K,) float32 .npy: the training normals' distance scale per bank row or grid position, which the
    # "local_norm" image-score rule divides patch distances by; absent for the other rules
    local_scale_path: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_relpath(self.path)
        if self.stats_path is not None:
            check_relpath(self.stats_path)
        if self.local_scale_path is not None:
            check_relpath(self.local_scale_path)
        _require(
            (self.index_path is None) == (self.index_kind is None) == (self.index_params is None),
            f"{self.path}: index_path, index_kind and index_params come together",
        )
        if self.index_path is not None:
            check_relpath(self.index_path)
            _require(self.index_kind in INDEX_KINDS, f"{self.path}: unknown index kind {self.index_kind!r}")
        _require(self.encoding in BANK_ENCODINGS, f"{self.path}: unknown bank encoding {self.encoding!r}")
        _require(self.rows > 0 and self.dim > 0 and self.grid > 0, f"{self.path}: rows/dim/grid must be > 0")
        _require(self.feat_std > 0, f"{self.path}: feat_std must be > 0")
        _require(
            (self.pq_m is not None) == (self.encoding == "pq"), f"{self.path}: pq_m is set iff encoding pq"
        )
        if self.pq_m is not None:
            _require(self.pq_m > 0 and self.dim % self.pq_m == 0, f"{self.path}: pq_m must divide dim")


class DLFCoefficients(_Record):
    """Linear one-class SVMs of one combined variant: score = coef . per-bank scores (+ offset)."""

    image_coef: tuple[float, ...]
    image_offset: float
    pixel_coef: tuple[float, ...]
    pixel_offset: float


class ScoringSpec(_Record):
    """Per-bank scoring and decision fusion. `score_stats`: variant -> named normalisation stats."""

    rgb_lambda: float
    blur_sigma_px: float
    reweight_k: int
    output_size: int
    score_stats: dict[str, dict[str, float]] = {}
    dlf: dict[str, DLFCoefficients] = {}
    # The image-score rule of every bank and its parameters; older manifests had only max_patch.
    image_score_rule: str = "max_patch"
    image_topk_fraction: float = 0.01  # "topk_mean": share of patches averaged
    local_norm_key: str = "row"  # "local_norm": the bank's local_scale_path is per bank row or position

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.blur_sigma_px >= 0, "ScoringSpec: blur_sigma_px must be >= 0")
        _require(self.reweight_k >= 1 and self.output_size > 0, "ScoringSpec: reweight_k/output_size > 0")
        _require(
            self.image_score_rule in IMAGE_SCORE_RULES,
            f"ScoringSpec: unknown image_score_rule {self.image_score_rule!r}",
        )
        _require(0 < self.image_topk_fraction <= 1, "ScoringSpec: image_topk_fraction must lie in (0, 1]")
        _require(self.local_norm_key in LOCAL_NORM_KEYS, f"ScoringSpec: unknown {self.local_norm_key!r}")


class Thresholds(_Record):
    """The decision: image score of `variant` above `image_threshold` is NOK."""

    variant: str
    image_threshold: float
    false_reject_rate: float  # on held-out normal parts, at this threshold
    pixel_threshold: float | None = None
    # variant -> 21 quantiles (0, 5, ..., 100 %) of out-of-fold image scores of the validation normals:
    # the reference the collector compares each station's live OK scores against (drift alarms)
    score_quantiles: dict[str, tuple[float, ...]] = {}

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0.0 <= self.false_reject_rate <= 1.0, "Thresholds: false_reject_rate must lie in [0, 1]")
        for variant, quantiles in self.score_quantiles.items():
            ascending = all(a <= b for a, b in zip(quantiles, quantiles[1:], strict=False))
            _require(len(quantiles) >= 3 and ascending, f"Thresholds: score_quantiles[{variant}] must ascend")


class Provenance(_Record):
    """Where the model came from; `training_config` is the resolved config as JSON values."""

    dataset: str
    training_config: dict[str, Any]
    git_commit: str
    trainer_version: str
    host: str


class GoldenSample(_Record):
    """A self-test: this input (.npz with `rgb`, `xyz`) must reproduce these outputs on the station."""

    input_path: str
    expected_image_score: float
    expected_map_sha256: str  # sha256 of the anomaly map cast to little-endian float16, C order
    expected_map_mean: float
    tolerance_abs: float
    variant: str = "rgb+point+fusion"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_relpath(self.input_path)
        _require(self.input_path.endswith(".npz"), f"{self.input_path}: golden input must be .npz")
        _check_sha256(self.expected_map_sha256, self.input_path)
        _require(self.tolerance_abs >= 0, f"{self.input_path}: tolerance_abs must be >= 0")


class BundleManifest(_Record):
    """The whole manifest. `files` lists every file except manifest.json / manifest.sig with its sha256."""

    schema_version: str
    bundle_id: str
    version: str  # semver of this model for this class
    class_name: str
    preset: str
    random_weights: bool  # loud flag: backbones were NOT pretrained; scores mean little
    created_utc: str
    expires_utc: str
    anti_rollback_counter: int
    input_spec: InputSpec
    feature_spec: FeatureSpec
    networks: dict[str, ArtifactRef]
    banks: dict[str, BankSpec]
    scoring: ScoringSpec
    thresholds: Thresholds
    precision: str
    provenance: Provenance
    golden: list[GoldenSample] = []
    files: dict[str, str] = {}
    # An int8 or fp16 bundle may also carry its fp32 graphs (`networks` holds the graphs of `precision`), for
    # a station told to run fp32 (StationConfig.precision); empty for an fp32 bundle.
    fp32_networks: dict[str, ArtifactRef] = {}
    # golden expectations of `fp32_networks`: what a station told to run fp32 replays instead of `golden`
    fp32_golden: list[GoldenSample] = []
    # ("rgb", "point") or ("rgb",): an RGB-only model ships the rgb bank alone and no UFF (see MODALITIES)
    modalities: tuple[str, ...] = ("rgb", "point")

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants this model scores: all five, or ("rgb",) for an RGB-only model."""
        return ALL_VARIANTS if "point" in self.modalities else ("rgb",)

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.schema_version == SCHEMA_VERSION, f"unknown schema_version {self.schema_version!r}")
        _require(self.modalities in MODALITIES, f"modalities must be one of {MODALITIES}: {self.modalities}")
        _require(
            bool(_BUNDLE_ID.fullmatch(self.bundle_id)), f"bundle_id must be uuid4 hex: {self.bundle_id!r}"
        )
        _require(bool(_SEMVER.fullmatch(self.version)), f"version must be semver: {self.version!r}")
        _require(
            parse_utc(self.expires_utc) > parse_utc(self.created_utc), "expires_utc must follow created_utc"
        )
        _require(self.anti_rollback_counter >= 0, "anti_rollback_counter must be >= 0")
        _require(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}: {self.precision!r}")
        if self.fp32_networks:
            _require(self.precision != "fp32", "fp32_networks belong to an int8 or fp16 bundle")
            orphans = sorted(set(self.fp32_networks) - set(self.networks))
            _require(not orphans, f"fp32_networks {orphans} have no counterpart in networks")
        _require(not self.fp32_golden or bool(self.fp32_networks), "fp32_golden needs fp32_networks")
        unknown = sorted(set(self.networks) - set(NETWORK_NAMES))
        _require(not unknown, f"unknown network name(s) {unknown}; known: {NETWORK_NAMES}")
        if "point" in self.modalities:
            _require("uff" in self.networks, "networks must include 'uff' (every rgb+point model fuses)")
        else:
            banks = sorted(self.banks)
            _require(banks == ["rgb"], f"an RGB-only model has the rgb bank alone: {banks}")
            extra = sorted(set(self.networks) - {"rgb"})
            _require(not extra, f"an RGB-only model has no point network or UFF, got {extra}")
            _require(not self.scoring.dlf, "an RGB-only model has no decision-layer fusion")
            _require(self.thresholds.variant == "rgb", "an RGB-only model decides on the 'rgb' variant")
        _require(bool(self.banks), "at least one memory bank is required")
        unscaled = sorted(n for n, b in self.banks.items() if b.local_scale_path is None)
        _require(
            self.scoring.image_score_rule != "local_norm" or not unscaled,
            f"image_score_rule local_norm needs every bank's local_scale_path; missing for {unscaled}",
        )
        for relpath, digest in self.files.items():
            check_relpath(relpath)
            _check_sha256(digest, relpath)

    @classmethod
    def from_dict(cls, data: Any) -> BundleManifest:
        """Strict parse of a sealed manifest: the schema version is checked first, then every field."""
        if not isinstance(data, dict):
            raise SchemaError(f"manifest must be a JSON object, got {type(data).__name__}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise SchemaError(
                f"unknown schema_version {data.get('schema_version')!r}; expected {SCHEMA_VERSION}"
            )
        manifest = _convert(data, cls)
        manifest.check_sealed()
        return manifest

    def referenced_paths(self) -> list[str]:
        """Every file the manifest points at (networks, banks, bank stats, golden inputs), sorted."""
        paths = {ref.path for ref in self.networks.values()} | {bank.path for bank in self.banks.values()}
        paths |= {ref.path for ref in self.fp32_networks.values()}
        paths |= {sample.input_path for sample in self.fp32_golden}
        paths |= {bank.stats_path for bank in self.banks.values() if bank.stats_path is not None}
        paths |= {bank.index_path for bank in self.banks.values() if bank.index_path is not None}
        paths |= {b.local_scale_path for b in self.banks.values() if b.local_scale_path is not None}
        paths |= {sample.input_path for sample in self.golden}
        return sorted(paths)

    def check_sealed(self) -> None:
        """Raise SchemaError unless `files` is filled and covers every reference with matching hashes."""
        _require(bool(self.files), "manifest lists no files")
        missing = [p for p in self.referenced_paths() if p not in self.files]
        _require(not missing, f"referenced file(s) not listed in `files`: {missing}")
        for name, ref in [*self.networks.items(), *self.fp32_networks.items()]:
            _require(
                ref.sha256 == self.files[ref.path], f"network {name!r}: sha256 differs from files[{ref.path}]"
            )


def canonical_json(manifest: BundleManifest) -> bytes:
    """The signed bytes: sorted keys, no whitespace, ASCII, no NaN. Also what manifest.json holds."""
    return _json_text(manifest).encode("ascii")


def _reject_constant(name: str) -> Any:
    raise SchemaError(f"manifest contains {name}, which is not JSON")


def manifest_from_json(data: bytes) -> BundleManifest:
    """Parse and validate manifest.json bytes; anything unexpected raises SchemaError."""
    try:
        parsed = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"manifest.json is not valid JSON: {exc}") from None
    return BundleManifest.from_dict(parsed)
