"""House rules over every tracked text file: no comment, docstring or help text cites an internal issue
number (a reader outside the team cannot follow it), and none names a folder of one machine.

The patterns are built from pieces so that this file does not match them itself."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".html", ".cfg"}

_ISSUE = "[Ii]" + "ssue"
_FINDING = "[Ff]" + "inding"
ISSUE_CITATION = re.compile(
    rf"{_ISSUE}s? [0-9]+"  # the word and a number
    r"|\(" + "#" + r"[0-9]+\)"  # a number after a hash, in brackets
    rf"|{_FINDING} [0-9]+"  # a numbered finding
    rf"|{_ISSUE}'s"  # its possessive, naming something of one
    r"|the iss" + r"ue\b"  # one taken as known
)
MACHINE_FOLDERS = tuple("/" + name + "/" for name in ("work", "root", "home"))


def violations(name: str, text: str) -> list[str]:
    """`name:line: text` for each line of `text` that cites an issue or names a folder of one machine."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        if ISSUE_CITATION.search(line) or any(folder in line for folder in MACHINE_FOLDERS):
            hits.append(f"{name}:{number}: {line.strip()}")
    return hits


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    names = [n for n in listed.decode().split("\0") if n]
    return [
        ROOT / n
        for n in names
        if Path(n).suffix in TEXT_SUFFIXES
        and not (n.startswith("docs/screenshots/") and n.endswith(".log"))
        and (ROOT / n).is_file()  # a tracked file deleted in this checkout
    ]


def test_no_tracked_text_file_cites_an_issue_or_a_machine_s_folder() -> None:
    files = _tracked_text_files()
    assert any(f.name == "README.md" for f in files) and len(files) > 100  # the listing found the repository
    hits: list[str] = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        hits += violations(str(path.relative_to(ROOT)), data.decode("utf-8", errors="replace"))
    assert not hits, "cites an issue or names a folder of one machine:\n" + "\n".join(hits)


def test_the_check_finds_each_kind_of_citation_and_folder() -> None:
    sample = "\n".join(
        [
            "# limits (iss" + "ue 15): the message names the limit",
            "    folder (Iss" + "ues 14 and 18): a link",
            "fixed in (" + "#23)",
            "Finding" + " 9, scaled: 1 100 DEALERs",
            "the iss" + "ue's PROJ string froze the server",
            "as in the iss" + "ue, the server froze",
            "default='" + "/" + "home/me/models'",
            "python /" + "root/x.py",
            "out = '/" + "work/main/results'",
            "the issues: none of these lines cite one; an issue tracker, findings, /tmp/x",
        ]
    )
    assert violations("sample.py", sample) == [
        f"sample.py:{number}: {line.strip()}" for number, line in enumerate(sample.splitlines()[:9], 1)
    ]
