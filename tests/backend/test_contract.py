"""The contract is written once: docs/protocol.md lists every error code; the plugin keeps no list."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from earthdial.contract.wire import ErrorCode, error_codes

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


# --------------------------------------------------------------------------------------------------
# The runtime package holds only the runtime: training code lives in earthdial.training
# --------------------------------------------------------------------------------------------------

PACKAGE = ROOT / "backend" / "earthdial"
# The command line is the front door of both: its training commands (make-tiny-checkpoint, train-demo,
# eval-demo, export-training, finetune; cli/training.py) import the training package inside their own
# functions, never at the module's top.
FRONT_DOOR = "cli/training.py"


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, at the module's top level) for each import of a runtime module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "earthdial." * (node.level > 0) + (node.module or "")
            names = [f"{base}.{a.name}".replace("..", ".") for a in node.names]
            found += [(n, id(node) in top) for n in [base, *names] if n]
    return found


def test_runtime_modules_import_nothing_from_training() -> None:
    runtime = sorted(p for p in PACKAGE.rglob("*.py") if "training" not in p.relative_to(PACKAGE).parts)
    assert len(runtime) > 20 and not (PACKAGE / "train.py").exists()
    for path in runtime:
        for name, at_top in _imports(path):
            uses_training = name.startswith("earthdial.training") or name in ("training", "earthdial.train")
            if uses_training:
                assert path.relative_to(PACKAGE).as_posix() == FRONT_DOOR and not at_top, (
                    f"{path} imports {name}"
                )


def test_serving_loads_no_training_module() -> None:
    code = (
        "import sys, earthdial.cli.main, earthdial.serving.server, earthdial.serving.service, earthdial.model.engine, earthdial.model.checkpoint\n"
        "print(sorted(m for m in sys.modules if m.startswith('earthdial.training')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"


def test_the_import_walk_sees_a_training_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from .training import tiny\n\ndef f():\n    from . import training as train\n")
    assert ("earthdial.training.tiny", True) in _imports(module)
    assert ("earthdial.training", False) in _imports(module)
