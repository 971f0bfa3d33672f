"""A layer added to an existing GeoPackage in ONE SQLite transaction on the user's file, and the rules
for its name (docs/outputs.md, "GeoPackage writes: one SQLite transaction").

The layer is built in a scratch GeoPackage by GDAL, then copied in by SQL: a kill at any moment leaves the
file as it was or with the whole new layer, whoever else holds it open, in WAL mode or not. The other
layers and tables are never touched; only a layer marked as ours (``RESULT_MARK`` at the start of its
``gpkg_contents.description``) is ever replaced, and only when asked.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import urllib.parse
from typing import Any

from earthdial.contract.wire import RESULT_MARK, EarthDialError, ErrorCode
from earthdial.outputs.write_errors import write_error

__all__ = ["layer_to_write", "merge_layer"]

GPKG_APPLICATION_IDS = (0x47504B47, 0x47503130, 0x47503131)  # "GPKG"; "GP10", "GP11" for 1.0 and 1.1
BUSY_TIMEOUT_S = 30.0  # how long a GeoPackage another program keeps locked is waited for


def _connect(path: str, mode: str) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(os.fsencode(path)) + f"?mode={mode}"
    return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)


def _geopackage_refusal(con: sqlite3.Connection, path: str) -> EarthDialError | None:
    app_id = con.execute("PRAGMA application_id").fetchone()[0]
    tables = {r[0].lower() for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if app_id not in GPKG_APPLICATION_IDS or not {"gpkg_contents", "gpkg_spatial_ref_sys"} <= tables:
        return EarthDialError(
            ErrorCode.FOREIGN_OUTPUT,
            f"{path} is an SQLite database but not a GeoPackage: it is never changed; choose another name",
        )
    return None


def _open_geopackage(path: str, mode: str) -> sqlite3.Connection:
    """A connection to an existing GeoPackage; ``foreign_output`` when the file is anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise write_error(exc, path, f"cannot read {path}") from None
    if head != b"SQLite format 3\x00":
        raise EarthDialError(
            ErrorCode.FOREIGN_OUTPUT,
            f"{path} exists and is not a GeoPackage: it is never replaced; choose another name",
        )
    con = _connect(path, mode)
    try:
        refusal = _geopackage_refusal(con, path)
    except sqlite3.DatabaseError as exc:
        con.close()
        if "not a database" in str(exc) or "malformed" in str(exc):
            raise EarthDialError(
                ErrorCode.FOREIGN_OUTPUT, f"{path} is not a readable GeoPackage: {exc}"
            ) from None
        raise
    if refusal is not None:
        con.close()
        raise refusal
    return con


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _layer_row(con: sqlite3.Connection, name: str, schema: str = "main") -> tuple[str, str] | None:
    row = con.execute(
        f"SELECT table_name, description FROM {schema}.gpkg_contents WHERE lower(table_name) = lower(?)",
        (name,),
    ).fetchone()
    return (row[0], row[1] or "") if row else None


def _name_taken(con: sqlite3.Connection, name: str) -> bool:
    """A table, view or index of that name (or of its spatial index), or a layer with it as identifier."""
    names = (name.lower(), f"rtree_{name}_geom".lower())
    if con.execute(
        "SELECT 1 FROM main.sqlite_master WHERE type IN ('table', 'view', 'index') AND lower(name) IN (?, ?)",
        names,
    ).fetchone():
        return True
    return (
        con.execute("SELECT 1 FROM main.gpkg_contents WHERE identifier = ?", (name,)).fetchone() is not None
    )


def _layer_decision(
    con: sqlite3.Connection, path: str, name: str, overwrite: bool, exact: bool
) -> str | None:
    """Raise unless ``name`` may be written; returns the existing layer's stored name when it is replaced."""
    row = _layer_row(con, name)
    if row is None:
        if _name_taken(con, name):
            raise EarthDialError(
                ErrorCode.FOREIGN_OUTPUT if exact else ErrorCode.OUTPUT_EXISTS,
                f"{path} already holds a table named like {name!r} that is not an EarthDial layer; "
                "pass another --layer",
            )
        return None
    if not row[1].startswith(RESULT_MARK):
        raise EarthDialError(
            ErrorCode.FOREIGN_OUTPUT,
            f"layer {row[0]!r} of {path} is not an EarthDial result: it is never replaced; pass another --layer",
        )
    if not overwrite:
        raise EarthDialError(
            ErrorCode.OUTPUT_EXISTS,
            f"{path} already has a layer {row[0]!r}; pass --overwrite to replace it, or another --layer",
        )
    return row[0]


def layer_to_write(path: str, layer: str | None, base: str, overwrite: bool) -> str:
    """Checks an existing GeoPackage and picks the name: ``layer`` as given, or ``base`` made unique.
    Opened read-write although only read: a read-only connection cannot roll back the journal a killed
    write left (SQLITE_READONLY_ROLLBACK), a read-write one does so first, restoring the old content."""
    con = _open_geopackage(path, "rw")
    try:
        if layer is not None:
            _layer_decision(con, path, layer, overwrite, exact=True)
            return layer
        name, n = base, 1
        while _layer_row(con, name) is not None or _name_taken(con, name):
            n += 1
            name = f"{base}_{n}"
        return name
    finally:
        con.close()


def merge_layer(path: str, tmp: str, name: str, overwrite: bool, exact: bool) -> None:
    """Copy layer ``name`` from the scratch GeoPackage ``tmp`` into ``path`` in one transaction,
    replacing an older layer of ours of that name when ``overwrite``."""
    con = _open_geopackage(path, "rw")
    try:
        con.create_function("earthdial_srs", 2, _with_srs, deterministic=True)
        con.execute(
            "ATTACH DATABASE ? AS new", ("file:" + urllib.parse.quote(os.fsencode(tmp)) + "?mode=ro",)
        )
        con.execute("BEGIN IMMEDIATE")  # the write lock first: nothing changes between check and write
        try:
            refusal = _geopackage_refusal(con, path)
            if refusal is not None:
                raise refusal
            old = _layer_decision(con, path, name, overwrite, exact)
            if old is not None:
                _drop_layer(con, old)
            _copy_layer(con, name)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        con.execute("DETACH DATABASE new")
    finally:
        con.close()


def _tables(con: sqlite3.Connection, schema: str) -> dict[str, str]:
    rows = con.execute(f"SELECT name, sql FROM {schema}.sqlite_master WHERE type = 'table'")
    return {r[0].lower(): r[1] for r in rows}


def _columns_of(con: sqlite3.Connection, schema: str, table: str) -> list[tuple[str, bool, Any]]:
    """(name, not null, default) of each column."""
    return [(r[1], bool(r[3]), r[4]) for r in con.execute(f"PRAGMA {schema}.table_info({_q(table)})")]


def _drop_layer(con: sqlite3.Connection, name: str) -> None:
    """Remove a layer of ours and what GeoPackage keeps about it (its triggers go with its table)."""
    tables = _tables(con, "main")
    geom = (
        con.execute(
            "SELECT column_name FROM main.gpkg_geometry_columns WHERE lower(table_name) = lower(?)", (name,)
        ).fetchone()
        if "gpkg_geometry_columns" in tables
        else None
    )
    con.execute(f"DROP TABLE main.{_q(name)}")
    if geom is not None and f"rtree_{name}_{geom[0]}".lower() in tables:
        con.execute(f"DROP TABLE main.{_q(f'rtree_{name}_{geom[0]}')}")
    if "gpkg_metadata_reference" in tables:
        ids = [
            r[0]
            for r in con.execute(
                "SELECT md_file_id FROM main.gpkg_metadata_reference WHERE lower(table_name) = lower(?)",
                (name,),
            )
        ]
        con.execute("DELETE FROM main.gpkg_metadata_reference WHERE lower(table_name) = lower(?)", (name,))
        for md in ids:  # metadata no other reference points at
            if not con.execute(
                "SELECT 1 FROM main.gpkg_metadata_reference WHERE md_file_id = ?", (md,)
            ).fetchone():
                con.execute("DELETE FROM main.gpkg_metadata WHERE id = ?", (md,))
    for table in (
        "gpkg_geometry_columns",
        "gpkg_extensions",
        "gpkg_ogr_contents",
        "gpkg_data_columns",
        "gpkg_contents",
    ):
        if table in tables:
            con.execute(f"DELETE FROM main.{table} WHERE lower(table_name) = lower(?)", (name,))
    if "sqlite_sequence" in tables:
        con.execute("DELETE FROM main.sqlite_sequence WHERE lower(name) = lower(?)", (name,))


def _copy_layer(con: sqlite3.Connection, name: str) -> None:
    """Layer ``name`` of the attached scratch GeoPackage ``new`` into main: the table, its rows, its
    spatial index, its rows in the GeoPackage tables, then its triggers (after the rows, since their
    GeoPackage SQL functions exist only in GDAL)."""
    main_tables = _tables(con, "main")
    new_master = con.execute("SELECT type, name, tbl_name, sql FROM new.sqlite_master").fetchall()
    geom_col, srs_id = con.execute(
        "SELECT column_name, srs_id FROM new.gpkg_geometry_columns WHERE table_name = ?", (name,)
    ).fetchone()
    srs = _srs_in_main(con, srs_id)

    con.execute(next(sql for kind, nm, _t, sql in new_master if kind == "table" and nm == name))
    cols = [c[0] for c in _columns_of(con, "new", name)]
    picks = [
        f"earthdial_srs({_q(c)}, {int(srs)})" if c == geom_col and srs != srs_id else _q(c) for c in cols
    ]
    con.execute(
        f"INSERT INTO main.{_q(name)} ({', '.join(map(_q, cols))}) "
        f"SELECT {', '.join(picks)} FROM new.{_q(name)}"
    )
    rtree = f"rtree_{name}_{geom_col}"
    rtree_sql = next((sql for kind, nm, _t, sql in new_master if kind == "table" and nm == rtree), None)
    if rtree_sql:
        con.execute(rtree_sql)
        con.execute(f"INSERT INTO main.{_q(rtree)} SELECT * FROM new.{_q(rtree)}")

    new_tables = _tables(con, "new")
    for table in ("gpkg_contents", "gpkg_geometry_columns", "gpkg_extensions", "gpkg_ogr_contents"):
        if table not in new_tables:
            continue
        if table not in main_tables:
            if table == "gpkg_ogr_contents":
                continue  # GDAL's own feature counts: a file without them is counted by GDAL itself
            con.execute(new_tables[table])
            main_tables[table] = new_tables[table]
        values: dict[str, Any] = (
            {"srs_id": srs} if table in ("gpkg_contents", "gpkg_geometry_columns") else {}
        )
        if (
            table == "gpkg_contents"
            and con.execute("SELECT 1 FROM main.gpkg_contents WHERE identifier = ?", (name,)).fetchone()
        ):
            values["identifier"] = None  # unique in GeoPackage; another layer of the user's has it
        _copy_rows(con, table, "table_name = ?", name, values)

    counts = "gpkg_ogr_contents" in main_tables
    for kind, _nm, tbl, sql in new_master:
        if kind == "trigger" and tbl == name and (counts or "gpkg_ogr_contents" not in sql):
            con.execute(sql)


def _copy_rows(con: sqlite3.Connection, table: str, where: str, key: Any, values: dict[str, Any]) -> None:
    """The rows of ``new.table`` matching ``where`` into ``main.table``, with ``values`` set, over the
    columns both have (a newer GeoPackage may have more; a NOT NULL one without default gets 'undefined')."""
    new_cols = {c[0] for c in _columns_of(con, "new", table)}
    cols, picks, params = [], [], []
    for col, notnull, default in _columns_of(con, "main", table):
        if col in values:
            cols.append(col)
            picks.append("?")
            params.append(values[col])
        elif col in new_cols:
            cols.append(col)
            picks.append(_q(col))
        elif notnull and default is None:
            cols.append(col)
            picks.append("'undefined'")
    con.execute(
        f"INSERT INTO main.{table} ({', '.join(map(_q, cols))}) SELECT {', '.join(picks)} "
        f"FROM new.{table} WHERE {where}",
        (*params, key),
    )


def _srs_in_main(con: sqlite3.Connection, srs_id: int) -> int:
    """The srs_id in main for the scratch file's ``srs_id``: the same CRS when main has it (by authority
    code, else by definition), else the row copied, under a free id."""
    new_cols = [c[0] for c in _columns_of(con, "new", "gpkg_spatial_ref_sys")]
    row = dict(
        zip(
            new_cols,
            con.execute("SELECT * FROM new.gpkg_spatial_ref_sys WHERE srs_id = ?", (srs_id,)).fetchone(),
            strict=True,
        )
    )
    if str(row["organization"]).upper() != "NONE" or srs_id in (-1, 0):
        found = con.execute(
            "SELECT srs_id FROM main.gpkg_spatial_ref_sys WHERE upper(organization) = upper(?) "
            "AND organization_coordsys_id = ?",
            (row["organization"], row["organization_coordsys_id"]),
        ).fetchone()
    else:
        found = con.execute(
            "SELECT srs_id FROM main.gpkg_spatial_ref_sys WHERE definition = ?", (row["definition"],)
        ).fetchone()
    if found:
        return int(found[0])
    target = srs_id
    if con.execute("SELECT 1 FROM main.gpkg_spatial_ref_sys WHERE srs_id = ?", (srs_id,)).fetchone():
        target = (
            max(100000, con.execute("SELECT max(srs_id) FROM main.gpkg_spatial_ref_sys").fetchone()[0]) + 1
        )
    _copy_rows(con, "gpkg_spatial_ref_sys", "srs_id = ?", srs_id, {"srs_id": target})
    return target


def _with_srs(blob: bytes | None, srs_id: int) -> bytes | None:
    """A GeoPackage geometry blob with another srs_id in its header (bytes 4-7, in the blob's byte order)."""
    if blob is None or len(blob) < 8 or blob[:2] != b"GP":
        return blob
    out = bytearray(blob)
    struct.pack_into("<i" if out[3] & 1 else ">i", out, 4, srs_id)
    return bytes(out)
