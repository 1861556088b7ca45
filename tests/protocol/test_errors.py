"""Bundle errors read as one line: `[check] path: message`, with the parts kept for callers."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.errors import (
    ArchiveError,
    BundleError,
    ExpiredError,
    HashMismatchError,
    RollbackError,
    SchemaError,
    SignatureError,
)


@pytest.mark.parametrize(
    ("cls", "check"),
    [
        (BundleError, "bundle"),
        (SchemaError, "schema"),
        (SignatureError, "signature"),
        (HashMismatchError, "hashes"),
        (ExpiredError, "expiry"),
        (RollbackError, "rollback"),
        (ArchiveError, "archive"),
    ],
)
def test_message_names_check_and_file(cls: type[BundleError], check: str) -> None:
    err = cls("listed file is missing", Path("banks/rgb.npy"))
    assert str(err) == f"[{check}] banks/rgb.npy: listed file is missing"
    assert err.check == check and err.path == "banks/rgb.npy" and err.message == "listed file is missing"
    bare = cls("no file involved")
    assert str(bare) == f"[{check}] no file involved" and bare.path is None
    assert isinstance(err, BundleError) and not isinstance(err, ValueError)
