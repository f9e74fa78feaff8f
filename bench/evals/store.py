"""A resumable CSV of finished cells: one row per cell, keyed by the cell's identifying columns.

Rows are appended and flushed as soon as their engine run returns, so an interrupted experiment keeps
what it finished; on the next run those cells are skipped. Every row is one physical line (values never
hold a newline), so a row cut short by a crash is the file's last line without its newline, and it is
dropped on load. :meth:`CellStore.compact` rewrites the file sorted by key, so the committed CSV does not
depend on the order cells finished in. Several processes may fill one store at once (say one engine per
core, each on its own methods): appends and compaction hold an exclusive lock on ``<file>.lock``, and
compaction first reads back the rows the others appended. A value column added to the end of the fields
later is read as empty in the rows stored before it::

    store = CellStore(path, key_fields=("method", "length"), value_fields=("nll",))
    todo = [k for k in keys if not store.done(k)]
    store.add([{"method": "unscaled", "length": 1024, "nll": 3.2}])
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def canonical(value: Any) -> str:
    """The string a value is stored as: ``repr`` for floats (round-trips exactly), ``str`` otherwise."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


class CellStore:
    def __init__(self, path: Path | str, key_fields: Iterable[str], value_fields: Iterable[str]) -> None:
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self.fields = self.key_fields + tuple(value_fields)
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"duplicate fields in {self.fields}")
        self._rows: dict[tuple[str, ...], dict[str, str]] = {}
        with self._locked():
            self._load()

    def key(self, cell: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(canonical(cell[f]) for f in self.key_fields)

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(self.path.suffix + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _load(self) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        cut_short = bool(text) and not text.endswith("\n")
        if cut_short:
            text = text[:text.rfind("\n") + 1]  # drop a row (or header) cut short by a crash
        reader = csv.reader(io.StringIO(text))
        header = tuple(next(reader, None) or ())
        added = self.fields[len(header):]  # value columns added since the file was written: empty in its rows
        if header and (header + added != self.fields or len(header) < len(self.key_fields)):
            raise ValueError(f"{self.path} has columns {list(header)}, expected {list(self.fields)}; "
                             "move it away to start afresh")
        for values in reader:
            if len(values) == len(header):
                row = dict(zip(self.fields, values + [""] * len(added)))
                self._rows[self.key(row)] = row
        if cut_short or (header and added):
            self._rewrite()

    def done(self, cell: Mapping[str, Any]) -> bool:
        return self.key(cell) in self._rows

    def get(self, cell: Mapping[str, Any]) -> dict[str, str] | None:
        return self._rows.get(self.key(cell))

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows (a key already present is replaced on the next load and by :meth:`compact`)."""
        rows = [{f: canonical(row[f]) for f in self.fields} for row in rows]
        for row in rows:
            if any("\n" in v or "\r" in v for v in row.values()):
                raise ValueError(f"a stored value holds a newline: {row}")
        if not rows:
            return
        with self._locked(), self.path.open("a", encoding="utf-8", newline="") as f:
            new = f.tell() == 0
            writer = csv.writer(f, lineterminator="\n")
            if new:
                writer.writerow(self.fields)
            for row in rows:
                writer.writerow([row[f] for f in self.fields])
                self._rows[self.key(row)] = row
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict[str, str]]:
        """All rows, sorted by key (numbers compare as numbers)."""
        return [self._rows[k] for k in sorted(self._rows, key=_sort_key)]

    def compact(self) -> None:
        """Rewrite the file with one row per key, sorted, including rows other processes appended; atomic
        (written aside, then renamed)."""
        with self._locked():
            self._load()
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(self.fields)
            for row in self.rows():
                writer.writerow([row[f] for f in self.fields])
        os.replace(tmp, self.path)


def _sort_key(key: tuple[str, ...]) -> tuple:
    def one(value: str):
        try:
            return (0, float(value), "")
        except ValueError:
            return (1, 0.0, value)
    return tuple(one(v) for v in key)
