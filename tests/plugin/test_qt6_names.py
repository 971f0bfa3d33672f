"""The plugin's source, read for names that work on QGIS 3 / PyQt5 only, so that a regression shows here
without a Qt6 QGIS 4 to run it on.

Each entry of NAMES is a pattern, an example it must catch, and why the name breaks. A name may still be
used as the fallback of a version guard (``new if hasattr(Qgis, ...) else old``; after ``if new is not
None: return new``; an ``if``/``else`` on ``Qgis.versionInt()``), which is how the plugin supports QGIS 3.22
to 4 in one source. Comments and strings are not read.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "qgis_plugin" / "earthdial_qgis"


@dataclass(frozen=True)
class Name:
    pattern: str
    example: str
    why: str


NAMES = [
    # Qt5 / PyQt5 only
    Name(r"\.(exec|print)_\(", "dialog.exec_()", "PyQt6 has only exec() and print()"),
    Name(
        r"\bQtWidgets\.(QAction|QActionGroup|QShortcut|QUndoStack|QUndoCommand|QUndoGroup|QFileSystemModel)\b",
        "QtWidgets.QAction(icon, text, parent)",
        "moved to QtGui in Qt6",
    ),
    Name(r"\bQRegExp\w*", "QRegExpValidator(QRegExp('[a-z]+'))", "removed in Qt6: QRegularExpression"),
    Name(
        r"\bQDesktopWidget\b|\.desktop\(\)",
        "QApplication.desktop().screenGeometry()",
        "removed in Qt6: QScreen",
    ),
    Name(r"\bqApp\b", "QtWidgets.qApp.processEvents()", "not in PyQt6: QApplication.instance()"),
    Name(r"\bPyQt5\b", "PyQt5.QtCore.Qt", "the binding QGIS runs on: qgis.PyQt or qtpy"),
    Name(
        r"\bQ(TextCodec|StringRef|Matrix)\b|\bQtWebKit\w*", "QTextCodec.codecForName('utf-8')", "not in Qt6"
    ),
    Name(
        r"\bQt\.[A-Z]\w*\b(?![\w.(\[])",
        "label.setAlignment(Qt.AlignLeft)",
        "PyQt6 knows enum members only by their enum: Qt.AlignmentFlag.AlignLeft",
    ),
    Name(
        r"\bQ(?!gs)[A-Z]\w*\.(?!Q)[A-Z]\w*\b(?![\w.(\[])",
        "QSizePolicy.Expanding",
        "PyQt6 knows enum members only by their enum: QSizePolicy.Policy.Expanding",
    ),
    Name(
        r"\b\w*event\.(pos|globalPos|localPos|windowPos|screenPos|x|y|globalX|globalY)\(\)",
        "event.pos()",
        "Qt6 mouse events give position() (QgsMapMouseEvent: originalPixelPoint())",
    ),
    Name(r"\.delta\(\)", "wheel.delta() / 120", "removed in Qt6: angleDelta()"),
    Name(
        r"fontMetrics\(\)\.width\(", "label.fontMetrics().width(text)", "removed in Qt6: horizontalAdvance()"
    ),
    Name(r"\.setMargin\(", "layout.setMargin(4)", "removed in Qt6: setContentsMargins()"),
    Name(r"\b(to|from)Time_t\b", "QDateTime.fromTime_t(0)", "removed in Qt6: fromSecsSinceEpoch()"),
    # QGIS 3 API that QGIS 4 removes or that today's LTRs deprecate (a warning on every call)
    Name(r"\bQgsProcessing\.Type\w+", "QgsProcessing.TypeRaster", "Qgis.ProcessingSourceType (QGIS >= 3.36)"),
    Name(
        r"\bQgsWkbTypes\.\w+", "QgsWkbTypes.PolygonGeometry", "Qgis.WkbType, Qgis.GeometryType (QGIS >= 3.30)"
    ),
    Name(
        r"\bQgsMapLayerProxyModel\.\w+Layer\b", "QgsMapLayerProxyModel.RasterLayer", "Qgis.LayerFilter (3.34)"
    ),
    Name(r"\.setMinimal\(\)", "extent.setMinimal()", "deprecated in QGIS 3.34: setNull()"),
    Name(r"\.grayBand\(\)", "renderer.grayBand()", "deprecated in QGIS 3.38: inputBand()"),
]

# A test naming one of these chooses between the new API and the old: both branches may name the old.
GUARD = re.compile(r"\b(hasattr|getattr|versionInt|QGIS_VERSION_INT|QT_VERSION|PYQT_VERSION)\b")


def code_only(source: str) -> str:
    """``source`` with its comments and strings blanked out, every other character where it was."""
    lines = source.splitlines(keepends=True)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.COMMENT, tokenize.STRING):
            continue
        (row, col), (end_row, end_col) = token.start, token.end
        for r in range(row, end_row + 1):
            line = lines[r - 1]
            a = col if r == row else 0
            b = end_col if r == end_row else len(line.rstrip("\n"))
            lines[r - 1] = line[:a] + " " * (b - a) + line[b:]
    return "".join(lines)


def guarded_spans(tree: ast.AST) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where code runs only on one side of a version guard: (start, end) as (line, column) pairs."""
    from_getattr = {  # names bound to getattr(...): `x is not None` tests for a new API
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "getattr"
        for target in node.targets
        if isinstance(target, ast.Name)
    }

    def is_guard(test: ast.expr) -> bool:
        names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
        return bool(GUARD.search(ast.unparse(test))) or bool(names & from_getattr)

    def span(nodes: list[ast.stmt] | list[ast.expr]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        return [((n.lineno, n.col_offset), (n.end_lineno or n.lineno, n.end_col_offset or 0)) for n in nodes]

    spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp)) and is_guard(node.test):
            branches = [node.body, node.orelse] if isinstance(node, ast.IfExp) else [*node.body, *node.orelse]
            spans += span(branches)  # type: ignore[arg-type]
        for body in (getattr(node, "body", None), getattr(node, "orelse", None)):
            if not isinstance(body, list):
                continue
            for i, stmt in enumerate(body):  # `if new: return ...` then the old way, to the block's end
                if (
                    isinstance(stmt, ast.If)
                    and is_guard(stmt.test)
                    and isinstance(stmt.body[-1], ast.Return | ast.Raise)
                ):
                    spans += span(body[i + 1 :])
                    break
    return spans


def unguarded_uses(source: str, pattern: str) -> list[tuple[int, str]]:
    """(line number, line) of each use of ``pattern`` in ``source``'s code outside a version guard."""
    spans = guarded_spans(ast.parse(source))
    code = code_only(source)
    starts = [0]
    for line in code.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    found = []
    for match in re.finditer(pattern, code):
        row = next(i for i in range(len(starts) - 1) if starts[i] <= match.start() < starts[i + 1])
        at = (row + 1, match.start() - starts[row])
        if not any(a <= at < b for a, b in spans):
            found.append((row + 1, source.splitlines()[row].strip()))
    return found


def plugin_files() -> list[Path]:
    files = sorted(PLUGIN.rglob("*.py"))
    assert len(files) > 20, f"the plugin's modules were not found under {PLUGIN}"
    return files


@pytest.mark.parametrize("name", NAMES, ids=lambda n: n.example)
def test_the_plugin_names_nothing_that_breaks_on_qt6_or_qgis4(name: Name) -> None:
    found = [
        f"{path.relative_to(PLUGIN)}:{line}: {text}"
        for path in plugin_files()
        for line, text in unguarded_uses(path.read_text(encoding="utf-8"), name.pattern)
    ]
    assert not found, f"{name.why}:\n" + "\n".join(found)


@pytest.mark.parametrize("name", NAMES, ids=lambda n: n.example)
def test_each_name_is_caught_unless_a_version_guard_chooses_it(name: Name) -> None:
    assert unguarded_uses(f"def f(dialog, event):\n    return {name.example}\n", name.pattern), name.example
    # the same use as the fallback of each guard the plugin writes is allowed
    guarded = [
        f"def f(event):\n    return new() if hasattr(Qgis, 'New') else {name.example}\n",
        f"def f(event):\n    new = getattr(Qgis, 'New', None)\n    if new is not None:\n        return new\n"
        f"    return {name.example}\n",
        f"def f(event):\n    if Qgis.versionInt() >= 33800:\n        x = 1\n    else:\n        x = {name.example}\n",
    ]
    for source in guarded:
        assert not unguarded_uses(source, name.pattern), source
    # ... but a test that is no version guard allows nothing, nor do comments and strings count
    assert unguarded_uses(
        f"def f(event, a):\n    return {name.example} if a is not None else 0\n", name.pattern
    )
    assert not unguarded_uses(f"def f():\n    return 1  # not {name.example}\n", name.pattern)
