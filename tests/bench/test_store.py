"""The resumable cell store: round trip, canonical keys, a row cut short by a crash, sorted compaction."""

from __future__ import annotations

import pytest

from bench.evals.store import CellStore, canonical

KEYS, VALUES = ("method", "length", "depth"), ("ppl", "passed")


def store(path) -> CellStore:
    return CellStore(path / "cells.csv", KEYS, VALUES)


def test_rows_survive_a_reload_and_keys_compare_as_stored(tmp_path):
    s = store(tmp_path)
    s.add([{"method": "unscaled", "length": 4096, "depth": 0.2, "ppl": 12.5, "passed": True}])
    again = store(tmp_path)
    assert again.done({"method": "unscaled", "length": "4096", "depth": "0.2"})
    assert again.done({"method": "unscaled", "length": 4096, "depth": round(2 / 10, 1)})
    assert not again.done({"method": "unscaled", "length": 4096, "depth": 0.8})
    assert again.get({"method": "unscaled", "length": 4096, "depth": 0.2}) == {
        "method": "unscaled", "length": "4096", "depth": "0.2", "ppl": "12.5", "passed": "True"}


def test_floats_are_stored_exactly():
    value = 1 / 3
    assert float(canonical(value)) == value
    assert canonical(0.1 + 0.2) != canonical(0.3)


def test_a_row_cut_short_is_dropped_and_the_file_repaired(tmp_path):
    s = store(tmp_path)
    s.add([{"method": "a", "length": 1, "depth": 0.1, "ppl": 1.0, "passed": False}])
    with s.path.open("a") as f:
        f.write("b,2,0.1,3.")  # a crash mid-row: no newline
    again = store(tmp_path)
    assert len(again) == 1
    assert again.path.read_text().endswith("\n")
    again.add([{"method": "b", "length": 2, "depth": 0.1, "ppl": 3.5, "passed": True}])
    assert len(store(tmp_path)) == 2


def test_a_header_cut_short_is_repaired(tmp_path):
    (tmp_path / "cells.csv").write_text("method,len")
    s = store(tmp_path)
    s.add([{"method": "a", "length": 1, "depth": 0.1, "ppl": 1.0, "passed": False}])
    assert len(store(tmp_path)) == 1


def test_other_columns_are_refused(tmp_path):
    (tmp_path / "cells.csv").write_text("method,length\n")
    with pytest.raises(ValueError, match="expected"):
        store(tmp_path)


def test_compact_keeps_the_last_row_per_key_sorted_by_number(tmp_path):
    s = store(tmp_path)
    s.add([{"method": "m", "length": n, "depth": 0.5, "ppl": n, "passed": True} for n in (16384, 512, 4096)])
    s.add([{"method": "m", "length": 512, "depth": 0.5, "ppl": 1.0, "passed": False}])
    s.compact()
    lines = s.path.read_text().splitlines()
    assert lines[0] == "method,length,depth,ppl,passed"
    assert [line.split(",")[1] for line in lines[1:]] == ["512", "4096", "16384"]
    assert lines[1].endswith("1.0,False")


def test_values_with_newlines_are_refused(tmp_path):
    with pytest.raises(ValueError, match="newline"):
        store(tmp_path).add([{"method": "m", "length": 1, "depth": 0.1, "ppl": "a\nb", "passed": True}])


def test_two_writers_share_one_store(tmp_path):
    # Two processes, one engine each, fill one store: neither loses the other's rows when it compacts.
    a, b = store(tmp_path), store(tmp_path)
    a.add([{"method": "a", "length": 1, "depth": 0.1, "ppl": 1.0, "passed": True}])
    b.add([{"method": "b", "length": 1, "depth": 0.1, "ppl": 2.0, "passed": True}])
    a.compact()
    b.add([{"method": "b", "length": 2, "depth": 0.1, "ppl": 3.0, "passed": False}])
    b.compact()
    assert len(store(tmp_path)) == 3
    assert [line.split(",")[0] for line in a.path.read_text().splitlines()[1:]] == ["a", "b", "b"]


def test_a_value_column_added_later_reads_as_empty_in_older_rows(tmp_path):
    (tmp_path / "cells.csv").write_text("method,length,depth,ppl\nm,512,0.5,1.0\n")
    s = store(tmp_path)
    assert s.get({"method": "m", "length": 512, "depth": 0.5}) == {
        "method": "m", "length": "512", "depth": "0.5", "ppl": "1.0", "passed": ""}
    assert s.path.read_text().splitlines() == ["method,length,depth,ppl,passed", "m,512,0.5,1.0,"]
