"""The plugin takes the contract from the backend: no list of the backend's tasks, presets or error codes
is written in the plugin. Read against a running backend's status."""

from __future__ import annotations

import ast

from plugin_testing import ROOT

PLUGIN = ROOT / "qgis_plugin" / "earthdial_qgis"
SHARED = {
    "wire.py",
    "client.py",
    "result_features.py",
}  # the backend's own modules, copied in by the build


def _literal_groups(path) -> list[tuple[int, set[str]]]:
    """(line, strings) of every list, tuple, set or dict literal in a module."""
    groups = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)) and items:
            strings = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
            groups.append((node.lineno, strings))
    return groups


def test_the_plugin_lists_nothing_the_backend_status_lists(backend) -> None:
    from earthdial_qgis.contract.client import Client

    with Client(backend.endpoint, timeout_s=10) as client:
        status = client.status()
    lists = {
        "tasks": {t["name"] for t in status["tasks"]},
        "presets": {p["name"] for p in status["presets"]},
        "error codes": set(status["error_codes"]),
        "preset descriptions": {p["description"] for p in status["presets"]},
    }
    assert len(lists["tasks"]) >= 14 and len(lists["presets"]) >= 10
    modules = [p for p in PLUGIN.rglob("*.py") if p.name not in SHARED or p.parent != PLUGIN / "contract"]
    assert len(modules) > 20
    found = []
    for module in modules:
        for line, strings in _literal_groups(module):
            for what, names in lists.items():
                if len(strings & names) >= 3:  # a second copy of (part of) a backend list
                    found.append(f"{module.relative_to(ROOT)}:{line} repeats the backend's {what}")
        text = module.read_text(encoding="utf-8")
        found += [
            f"{module.relative_to(ROOT)} repeats {d!r}" for d in lists["preset descriptions"] if d in text
        ]
    assert not found, "\n".join(found)


def test_the_check_finds_a_copied_list(tmp_path) -> None:
    """The check above can fail: a module holding a few of the backend's task names is caught."""
    module = tmp_path / "copy.py"
    module.write_text('TASKS = ("chat", "caption", "refer")\nOTHER = ["a", "b"]\n')
    assert [s for _, s in _literal_groups(module)] == [{"chat", "caption", "refer"}, {"a", "b"}]
