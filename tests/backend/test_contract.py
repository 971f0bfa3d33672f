"""The contract is written once: docs/protocol.md lists every error code; the plugin keeps no list."""

from __future__ import annotations

import re
from pathlib import Path

from earthdial.protocol import ErrorCode, error_codes

ROOT = Path(__file__).resolve().parents[2]


def _codes_in_tables(text: str) -> set[str]:
    """The codes in the first column of docs/protocol.md's `| code | cause |` tables."""
    codes: set[str] = set()
    for table in re.findall(r"\| code \| cause \|\n\|---\|---\|\n((?:\|.*\n)+)", text):
        for row in table.splitlines():
            codes |= set(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
    return codes


def test_protocol_md_lists_every_error_code_and_no_other() -> None:
    documented = _codes_in_tables((ROOT / "docs" / "protocol.md").read_text(encoding="utf-8"))
    assert documented == set(error_codes())


def test_error_codes_are_the_error_code_class() -> None:
    assert error_codes() == sorted(v for k, v in vars(ErrorCode).items() if not k.startswith("_"))
    assert len(set(error_codes())) == len(error_codes())  # no code spelled twice under two names
