"""Unreadable test scans are visible: a banner above the tables names how many each class lost."""

from __future__ import annotations

import logging

import pytest

from trainer.evaluate import _skipped_banner


def test_banner_counts_skipped_scans_per_class(caplog: pytest.LogCaptureFixture) -> None:
    meta = {
        "ring": {"test_count": 28, "skipped": [("ring/test/good/xyz/003.tiff", "truncated TIFF")] * 2},
        "gland": {"test_count": 30, "skipped": []},
    }
    with caplog.at_level(logging.WARNING, logger="m3dm.trainer"):
        banner = _skipped_banner(meta)
    assert "ring: 2 of 30" in banner and "gland" not in banner
    assert any("2 test scan(s)" in r.getMessage() for r in caplog.records)


def test_no_banner_when_nothing_was_skipped() -> None:
    assert _skipped_banner({"ring": {"test_count": 30, "skipped": []}, "peg": {"test_count": 3}}) == ""
