#!/usr/bin/env python3
"""Build the installable QGIS plugin zip: dist/earthdial_qgis.zip holding earthdial_qgis/.

The zip has every .py (and the icon and help page) of qgis_plugin/earthdial_qgis/ and its subpackages (not a local
vendor/ folder of installed dependencies) plus the top-level metadata.txt, and the contract shared with
the backend: wire.py, client.py, protocol.py and result_features.py are written once, in backend/earthdial/, and copied into
the plugin from there (the repository holds no copy and no symlink; `--sync` copies them into
qgis_plugin/earthdial_qgis/ for running the plugin from a checkout, as its tests do). Entries get a fixed
date so that builds are reproducible. It also holds the backend as a wheel, wheels/earthdial_qgis-<version>-
py3-none-any.whl (written here from pyproject.toml: Python 3.11+), which the panel's *Install backend...*
installs into a venv of its own; the zip must stay under the plugin site's 25 MB. Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qgis_plugin" / "earthdial_qgis"
METADATA = ROOT / "metadata.txt"
PYPROJECT = ROOT / "pyproject.toml"
BACKEND = ROOT / "backend" / "earthdial"
SHARED = (
    "contract/wire.py",
    "contract/client.py",
    "contract/result_features.py",
)  # the backend's modules the plugin runs as they are
SUFFIXES = {".py", ".svg", ".png", ".html"}  # .html: the help page the panel's Help opens
FIXED_DATE = (2024, 1, 1, 0, 0, 0)
MAX_ZIP_BYTES = 25 * 1024 * 1024  # plugins.qgis.org refuses larger uploads
WHEELS = "wheels"  # installer.WHEELS_DIR


EXCLUDED = {"__pycache__", "vendor"}  # vendor/: packages a user installed into their own copy


def package_files() -> list[Path]:
    return sorted(
        p
        for p in PACKAGE.rglob("*")
        if p.suffix in SUFFIXES
        and not EXCLUDED & set(p.relative_to(PACKAGE).parts)
        and p.is_file()
        and p.relative_to(PACKAGE).as_posix() not in SHARED  # taken from the backend, not a stale copy
    )


def sync_shared(package: Path = PACKAGE) -> list[Path]:
    """Copy the shared modules from the backend into the plugin folder where they differ; the copied paths."""
    copied = []
    for name in SHARED:
        source, target = BACKEND / name, package / name
        data = source.read_bytes()
        if target.is_symlink() or not target.is_file() or target.read_bytes() != data:
            target.unlink(missing_ok=True)
            target.write_bytes(data)
            copied.append(target)
    return copied


def _add(zf: zipfile.ZipFile, arcname: str, path: Path) -> None:
    info = zipfile.ZipInfo(arcname, FIXED_DATE)
    info.external_attr = 0o644 << 16  # a regular file, whatever the source was (a symlink, say)
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, path.read_bytes())  # read_bytes follows symlinks


def _field(path: Path, pattern: str) -> str | None:
    match = re.search(pattern, path.read_text(encoding="utf-8"), re.MULTILINE)
    return match.group(1) if match else None


def versions() -> tuple[str | None, str | None]:
    """(pyproject.toml's version, metadata.txt's version): the package and the plugin are released together."""
    return (
        _field(PYPROJECT, r'^version\s*=\s*"([^"]+)"'),
        _field(METADATA, r"^version\s*=\s*(\S+)"),
    )


def qgis4_ready() -> bool:
    """Whether metadata.txt offers the plugin to QGIS 4 (Qt6): the plugin site decides that from
    qgisMaximumVersion >= 4.0, QGIS's own installer from supportsQt6."""
    maximum = _field(METADATA, r"^qgisMaximumVersion\s*=\s*(\d+)\.")
    qt6 = _field(METADATA, r"^supportsQt6\s*=\s*(\S+)")
    return maximum is not None and int(maximum) >= 4 and (qt6 or "").lower() in ("true", "yes")


def _requirement(spec: str, extra: str = "") -> str:
    """A Requires-Dist value: the requirement, its marker, and for an optional dependency its extra."""
    req, _, marker = (part.strip() for part in spec.partition(";"))
    if extra:
        marker = f'({marker}) and extra == "{extra}"' if marker else f'extra == "{extra}"'
    return f"{req}; {marker}" if marker else req


def wheel_files() -> list[Path]:
    """The backend's files in the wheel: every module of backend/earthdial and the package data
    pyproject.toml names (the built-in demo model)."""
    project = _pyproject()
    data = project.get("tool", {}).get("setuptools", {}).get("package-data", {}).get("earthdial", [])
    found = {p for p in BACKEND.rglob("*.py") if "__pycache__" not in p.parts}
    for pattern in data:
        found |= {p for p in BACKEND.glob(pattern) if p.is_file()}
    return sorted(found)


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        raise SystemExit("building the backend wheel needs Python 3.11 or newer (tomllib)") from None
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def build_wheel(folder: Path) -> Path:
    """The backend (pyproject.toml's project) as a pure-Python wheel in `folder`, written here with the
    standard library (a wheel is a zip with a .dist-info folder) so that any Python 3.11+ builds it offline."""
    project = _pyproject()["project"]
    name, version = project["name"], project["version"]
    dist = re.sub(r"[-_.]+", "_", name).lower()
    info = f"{dist}-{version}.dist-info"
    metadata = [
        "Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", f"Summary: {project['description']}",
        f"License: {project.get('license', {}).get('text', '')}", f"Requires-Python: {project['requires-python']}",
    ]  # fmt: skip
    metadata += [f"Requires-Dist: {_requirement(spec)}" for spec in project.get("dependencies", [])]
    for extra, specs in project.get("optional-dependencies", {}).items():
        metadata.append(f"Provides-Extra: {extra}")
        metadata += [f"Requires-Dist: {_requirement(spec, extra)}" for spec in specs]
    scripts = "".join(f"{key} = {value}\n" for key, value in project.get("scripts", {}).items())
    entries: list[tuple[str, bytes]] = [
        (p.relative_to(BACKEND.parent).as_posix(), p.read_bytes()) for p in wheel_files()
    ]
    entries += [
        (f"{info}/METADATA", ("\n".join(metadata) + "\n").encode()),
        (
            f"{info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: build_plugin.py\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        ),
        (f"{info}/entry_points.txt", f"[console_scripts]\n{scripts}".encode()),
        (f"{info}/top_level.txt", f"{BACKEND.name}\n".encode()),
        (f"{info}/LICENSE", (ROOT / "LICENSE").read_bytes()),
    ]
    record = (
        "".join(f"{arc},sha256={_digest(data)},{len(data)}\n" for arc, data in entries) + f"{info}/RECORD,,\n"
    )
    entries.append((f"{info}/RECORD", record.encode()))
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for arcname, data in entries:
            entry = zipfile.ZipInfo(arcname, FIXED_DATE)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(entry, data)
    return wheel


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build(output: Path, with_wheel: bool = True) -> Path:
    if not METADATA.is_file():
        raise SystemExit(f"missing {METADATA}")
    if not qgis4_ready():
        raise SystemExit(
            f"{METADATA} must say qgisMaximumVersion=4.x and supportsQt6=True (QGIS 4 runs the plugin)"
        )
    package_version, plugin_version = versions()
    if package_version is None or package_version != plugin_version:
        raise SystemExit(
            f"version mismatch: pyproject.toml says {package_version}, metadata.txt says {plugin_version}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(output, "w") as zf:
        for path in package_files():
            _add(zf, f"{PACKAGE.name}/{path.relative_to(PACKAGE).as_posix()}", path)
        for name in SHARED:
            _add(zf, f"{PACKAGE.name}/{name}", BACKEND / name)
        _add(zf, f"{PACKAGE.name}/metadata.txt", METADATA)
        if with_wheel:
            with tempfile.TemporaryDirectory() as tmp:
                wheel = build_wheel(Path(tmp))
                if not wheel.name.startswith(f"earthdial_qgis-{package_version}-"):
                    raise SystemExit(f"the wheel {wheel.name} is not version {package_version}")
                info = zipfile.ZipInfo(f"{PACKAGE.name}/{WHEELS}/{wheel.name}", FIXED_DATE)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_STORED  # a wheel is compressed already
                zf.writestr(info, wheel.read_bytes())
    size = output.stat().st_size
    if size >= MAX_ZIP_BYTES:
        output.unlink()
        raise SystemExit(f"the plugin zip is {size / 2**20:.1f} MiB: the plugin site takes under 25 MB")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "dist" / "earthdial_qgis.zip")
    parser.add_argument(
        "--sync", action="store_true", help="only copy the shared modules into qgis_plugin/earthdial_qgis/"
    )
    parser.add_argument(
        "--no-wheel", action="store_true", help="leave out the backend wheel (a quick build for a checkout)"
    )
    args = parser.parse_args(argv)
    if args.sync:
        for path in sync_shared():
            print(path)
        return 0
    print(build(args.output.resolve(), with_wheel=not args.no_wheel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
