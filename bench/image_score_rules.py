"""Image-score rule x variant, mean I-AUROC over classes (issue 15): chosen on validation defects.

    python bench/image_score_rules.py --work runs/image_rules            # family A (`m3dm synth`)
    python bench/image_score_rules.py --work runs/image_rules_b --family b  # family B
    python bench/image_score_rules.py --work runs/site_rules --preset m3dm-site --size 224  # site encoder

Per class: fit the preset once (`trainer.fit.fit_class`, the product fit; m3dm-site first trains the
class's encoder with `trainer.site.train.train_site_for_class`, as `m3dm train` does), fit the local scales
of both keys from the training normals (`trainer.local_scale`, leave one image out), then for every rule:
bank image scores of the held-out normals -> score normaliser + DLF fitted on them (`trainer.dlf`, as the
trainer does) -> I-AUROC of the five variants on the validation-defect split and on the test split.

Validation defects, family A: the test split of a second `m3dm synth` data set with another seed (same
generator, other parts), scored by the models fitted on the first; the first's test split is only reported.
Family B: its generator's `validation_defects/` root (other seeds' good and defective scans); its test split
is reported for every rule and nothing is chosen on it.

Each frame is searched once per bank (`core.scoring.score_bank`, through `FrameScorer.bank_scores`); every
rule is then applied to that same search with `core.scoring.bank_image_score`, the station's one function.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import core.model  # noqa: E402
from core.config import PRESETS, SITE_BACKBONE, DLFConfig, FitConfig, PreprocessConfig, ScoreConfig  # noqa: E402
from core.model import BANKS, VARIANTS, FrameScorer  # noqa: E402
from core.scoring import BankScore, bank_image_score, score_bank  # noqa: E402

RULES: dict[str, ScoreConfig] = {
    "max_patch": ScoreConfig(),
    "max_blurred_map": ScoreConfig(image_rule="max_blurred_map"),
    "topk_mean 1%": ScoreConfig(image_rule="topk_mean", topk_fraction=0.01),
    "topk_mean 3%": ScoreConfig(image_rule="topk_mean", topk_fraction=0.03),
    "topk_mean 10%": ScoreConfig(image_rule="topk_mean", topk_fraction=0.10),
    "local_norm row": ScoreConfig(image_rule="local_norm", local_key="row"),
    "local_norm position": ScoreConfig(image_rule="local_norm", local_key="position"),
}
SINGLES = ("rgb", "point", "fusion")
log = logging.getLogger("bench.image_rules")


@contextlib.contextmanager
def recording_searches() -> Iterator[list[BankScore]]:
    """Keep every BankScore `FrameScorer.bank_scores` computes (it calls core.model.score_bank)."""
    seen: list[BankScore] = []

    def record(*args: object, **kwargs: object) -> BankScore:
        result = score_bank(*args, **kwargs)
        seen.append(result)
        return result

    core.model.score_bank = record
    try:
        yield seen
    finally:
        core.model.score_bank = score_bank


def rule_scores(
    scorer: FrameScorer, banks_by_key: dict[str, dict], features: object
) -> dict[str, np.ndarray]:
    """rule -> (3,) bank image scores of one frame, all from one search per bank; also "maps" (3, S, S)."""
    with recording_searches() as seen:
        _, maps = scorer.bank_scores(features)
    out: dict[str, np.ndarray] = {"maps": maps}
    for rule, cfg in RULES.items():
        banks = banks_by_key[cfg.local_key]
        out[rule] = np.array(
            [
                bank_image_score(
                    cfg, r.query_nc, banks[name], r.patch_dist_hw.reshape(-1), r.nearest_n, r.map_hw
                )
                for name, r in zip(BANKS, seen, strict=True)
            ],
            np.float32,
        )
    return out


def fit_local_banks(banks: dict, grids: dict[str, np.ndarray]) -> dict[str, dict]:
    """key -> banks carrying that key's local scales (one leave-one-image-out pass per bank)."""
    from trainer.local_scale import LocalScaleConfig, leave_one_image_out_distances, local_scales

    cfg = LocalScaleConfig()
    out: dict[str, dict] = {"row": {}, "position": {}}
    for name, bank in banks.items():
        dist_l, row_l, pos_l = leave_one_image_out_distances(grids[name], bank, cfg)
        rows = local_scales(dist_l, row_l, bank.feats_mc.shape[0], cfg)
        out["row"][name] = dataclasses.replace(bank, local_scale_k=rows)
        out["position"][name] = dataclasses.replace(
            bank, local_scale_k=local_scales(dist_l, pos_l, bank.grid**2, cfg)
        )
    return out


def evaluate_class(
    data: Path, val_data: Path | None, class_name: str, model_dir: Path, runners: object
) -> dict:
    """rule -> split -> variant -> I-AUROC for one class."""
    from edge.model_store import load_banks, load_model_info
    from trainer.dataset_features import extract_split
    from trainer.dlf import fit_dlf, fit_score_normaliser
    from trainer.fit import split_off_validation, uff_runner
    from trainer.metrics import image_auroc
    from trainer.train_uff import load_uff

    info = load_model_info(model_dir)
    preset, pre = info.preset, info.preprocess
    banks = load_banks(info)
    uff = uff_runner(load_uff(model_dir / "uff.safetensors"))
    scorer = FrameScorer(banks, None, None, uff, ScoreConfig())
    train = extract_split(data, class_name, "train", preset, pre, runners)
    held = extract_split(data, class_name, "validation", preset, pre, runners)
    if not held.refs:  # as fit_class does
        train, held = split_off_validation(train, class_name)
    grids = {
        "rgb": np.stack([f.rgb_hwc for f in train.features]),
        "point": np.stack([f.point_hwc for f in train.features]),
        "fusion": np.stack([scorer.fused_features(f) for f in train.features]),
    }
    banks_by_key = fit_local_banks(banks, grids)
    del grids, train
    held_scores = [rule_scores(scorer, banks_by_key, f) for f in held.features]
    held_maps = np.stack([s["maps"] for s in held_scores])
    splits = {"test": extract_split(data, class_name, "test", preset, pre, runners)}
    if val_data is not None:
        splits = {"validation": extract_split(val_data, class_name, "test", preset, pre, runners)} | splits
    frame_scores = {
        split: [
            {k: v for k, v in rule_scores(scorer, banks_by_key, f).items() if k != "maps"} for f in s.features
        ]
        for split, s in splits.items()
    }
    result: dict = {}
    one_px = np.zeros((len(BANKS), 1, 1), np.float32)
    for rule, cfg in RULES.items():
        held_image = np.stack([s[rule] for s in held_scores])
        normaliser = fit_score_normaliser(held_image, held_maps)
        dlf = fit_dlf(held_image, held_maps, normaliser, DLFConfig(), cfg)
        fused = FrameScorer(banks_by_key[cfg.local_key], dlf, normaliser, uff, cfg)
        for split, frames in frame_scores.items():
            per_variant = {v: [] for v in VARIANTS}
            for frame in frames:  # the image half of FrameScorer.combine (maps do not enter image scores)
                for variant, value in fused.combine(frame[rule], one_px).image.items():
                    per_variant[variant].append(value)
            labels = splits[split].labels
            result.setdefault(rule, {})[split] = {
                v: image_auroc(labels, np.asarray(s)) for v, s in per_variant.items()
            }
    return result


def fitted_class(data: Path, name: str, cfg: FitConfig, runners: object | None, model_dir: Path) -> object:
    """Fit the class into model_dir unless it is there; return its feature runners.

    runners None: the preset's rgb encoder is the class's own (m3dm-site), trained here first as `m3dm train`
    does, then loaded from model_dir like any backbone.
    """
    from trainer.backbones import WeightPaths, build_feature_runners
    from trainer.fit import fit_class
    from trainer.site.train import SiteConfig, train_site_for_class

    fitted = (model_dir / "model.json").is_file()
    if runners is None:
        if not fitted:
            train_site_for_class(data, name, cfg.preprocess, SiteConfig(), model_dir, cfg.preset.rgb_dim)
        runners = build_feature_runners(cfg.preset, WeightPaths(), model_dir)
    if not fitted:
        fit_class(data, name, cfg, runners, model_dir)
    return runners


SMALL = {"n_train": 6, "n_validation": 4, "n_test_good": 3, "n_test_per_defect": 2}  # --small: a smoke run


def synthesize_family(family: str, root: Path, seed: int, val: bool, small: bool, size_px: int) -> None:
    """`m3dm synth` defaults (family A; val: the test split only) or family B's defaults, once per root."""
    if (root / "done.json").is_file():
        return
    counts = SMALL if small else {}
    if family == "a":
        from trainer.synth import CLASS_NAMES, SynthConfig, synthesize

        if val:
            counts = counts | {"n_train": 1, "n_validation": 0}
        extra = {"width_px": size_px, "height_px": size_px} | ({"classes": CLASS_NAMES[:1]} if small else {})
        synthesize(root, SynthConfig(seed=seed, **counts, **extra), overwrite=True)
    else:
        from trainer.synth_b import CLASS_NAMES, SynthBConfig, synthesize_b

        extra = {"size_px": size_px} | ({"classes": CLASS_NAMES[:1]} if small else {})
        synthesize_b(root, SynthBConfig(seed=seed, **counts, **extra), overwrite=True)
    (root / "done.json").write_text(json.dumps({"family": family, "seed": seed}))


def class_names(root: Path) -> list[str]:
    from core.mvtec3d import discover_classes

    return discover_classes(root)


def table(per_class: dict[str, dict], split: str) -> tuple[str, dict[str, dict[str, float]]]:
    """Markdown rule x variant table of I-AUROC means over classes, and the means."""
    means = {
        rule: {v: float(np.mean([per_class[c][rule][split][v] for c in per_class])) for v in VARIANTS}
        for rule in RULES
    }
    lines = ["| rule | " + " | ".join(VARIANTS) + " | criterion¹ |", "|---|" + "---:|" * (len(VARIANTS) + 1)]
    for rule, row in means.items():
        crit = 0.5 * row["rgb+point+fusion"] + 0.5 * float(np.mean([row[s] for s in SINGLES]))
        lines.append(f"| {rule} | " + " | ".join(f"{row[v]:.3f}" for v in VARIANTS) + f" | {crit:.3f} |")
    return "\n".join(lines), means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/image_rules"))
    parser.add_argument("--family", choices=("a", "b"), default="a")
    parser.add_argument("--classes", nargs="*", default=None)
    parser.add_argument("--small", action="store_true", help="a tiny smoke run (one class, few scans)")
    parser.add_argument("--size", type=int, default=400, help="generated frame side (largest, family B), px")
    parser.add_argument("--preset", choices=("m3dm-free", "m3dm-site"), default="m3dm-free")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from trainer.backbones import WeightPaths, build_feature_runners
    from trainer.synth_b import VALIDATION_DEFECTS

    work: Path = args.work
    # Family A: a second data set's test split; family B: the validation-defect root its generator writes.
    data = work / "data"
    val_data = work / "val_data" if args.family == "a" else data / VALIDATION_DEFECTS
    t0 = time.perf_counter()
    synthesize_family(args.family, data, 0, False, args.small, args.size)
    if args.family == "a":  # family B's generator wrote its validation root with the data set
        synthesize_family("a", val_data, 1, True, args.small, args.size)
    log.info("data ready in %.0f s", time.perf_counter() - t0)
    preset = PRESETS[args.preset]
    runners = None if preset.rgb_backbone == SITE_BACKBONE else build_feature_runners(preset, WeightPaths())
    cfg = FitConfig(preset=preset, preprocess=PreprocessConfig(rgb_input_size=preset.rgb_input_size))
    per_class: dict[str, dict] = {}
    for name in args.classes or class_names(data):
        out = work / "results" / f"{name}.json"
        if out.is_file():
            per_class[name] = json.loads(out.read_text())
            continue
        model_dir = work / "models" / name
        class_runners = fitted_class(data, name, cfg, runners, model_dir)
        per_class[name] = evaluate_class(data, val_data, name, model_dir, class_runners)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(per_class[name], indent=1))
        log.info("class %s done at %.0f s", name, time.perf_counter() - t0)
    report = {"preset": preset.name, "classes": sorted(per_class), "seconds": time.perf_counter() - t0}
    for split in ("validation", "test"):
        if all(split in per_class[c]["max_patch"] for c in per_class):
            text, means = table(per_class, split)
            report[split] = means
            print(f"\n### {split} (mean over {len(per_class)} classes: {', '.join(sorted(per_class))})\n")
            print(text)
    print("\n¹ criterion = ½ full-variant I-AUROC + ½ mean of the three single banks' I-AUROC")
    print("\nper class full variant, test (rules in table order): " + ", ".join(
        f"{c} " + "/".join(f"{per_class[c][r]['test']['rgb+point+fusion']:.2f}" for r in RULES)
        for c in sorted(per_class)
    ))  # fmt: skip
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\n{time.perf_counter() - t0:.0f} s; {load}")
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
