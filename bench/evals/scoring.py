"""Pure aggregation of stored cells into the experiments' tables (rows of plain dicts), and Markdown.

Stored values are strings (see :mod:`bench.evals.store`); these functions parse what they use. Orders:
methods as given, lengths ascending.

- Passkey: accuracy per (method, variant, length) and a length x depth accuracy grid per method.
- Perplexity: per document ``exp(-mean logprob)`` over its scored tokens; a table cell is the mean of the
  per-document perplexities, as the paper's code averages them.
- Short context: per window the same, averaged over windows; the change against the unscaled model; how
  many windows have exactly the unscaled model's logprobs (the same digest).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import struct
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

Row = Mapping[str, str]


def logprob_digest(logprobs: Sequence[float]) -> str:
    """SHA-1 of the float64 bytes of ``logprobs``: equal digests mean bitwise equal logprobs."""
    return hashlib.sha1(struct.pack(f"<{len(logprobs)}d", *logprobs)).hexdigest()


def perplexity_values(logprobs: Sequence[float]) -> dict[str, float | int | str]:
    """The stored columns of one scored text: token count, NLL sum, perplexity, digest."""
    if not logprobs:
        raise ValueError("nothing was scored")
    nll = -math.fsum(logprobs)
    return {"scored_tokens": len(logprobs), "nll_sum": nll, "ppl": math.exp(nll / len(logprobs)),
            "logprobs_sha1": logprob_digest(logprobs)}


def _order(values: Iterable[str], first: Sequence[str] = ()) -> list[str]:
    values = set(values)
    return [v for v in first if v in values] + sorted(values - set(first))


Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(passed: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default); (0, 1) for no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = passed / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def passkey_accuracy(rows: Iterable[Row], methods: Sequence[str] = ()) -> list[dict]:
    """One row per (method, variant, length): cells, passed, accuracy and its Wilson 95 % interval, and how
    many of its cells were shared (the same computation as another method's, ``shared_from``)."""
    groups: dict[tuple[str, str, int], list[bool]] = defaultdict(list)
    shared: Counter[tuple[str, str, int]] = Counter()
    for row in rows:
        group = (row["method"], row["variant"], int(row["length"]))
        groups[group].append(row["passed"] == "True")
        shared[group] += bool(row.get("shared_from"))
    order = {m: i for i, m in enumerate(_order({k[0] for k in groups}, methods))}
    out = []
    for group in sorted(groups, key=lambda k: (order[k[0]], k[1], k[2])):
        method, variant, length = group
        passed = groups[group]
        low, high = wilson_interval(sum(passed), len(passed))
        out.append({"method": method, "variant": variant, "length": length, "cells": len(passed),
                    "passed": sum(passed), "accuracy": sum(passed) / len(passed), "low": low, "high": high,
                    "shared": shared[group]})
    return out


def passkey_shown(row: Mapping) -> str:
    """A row of :func:`passkey_accuracy` as a table shows it: ``"7/10 [0.40, 0.89]"``, then ``shared`` when
    its cells are another method's computations (``3 shared`` when some are)."""
    return f"{row['passed']}/{row['cells']} [{row['low']:.2f}, {row['high']:.2f}]" + _shared_note(row, "cells")


def _shared_note(row: Mapping, total: str) -> str:
    if not row.get("shared"):
        return ""
    return " shared" if row["shared"] == row[total] else f" ({row['shared']} shared)"


def passkey_grid(rows: Iterable[Row], method: str, variant: str
                 ) -> tuple[list[int], list[float], list[list[float | None]]]:
    """Lengths, depths and the accuracy (over seeds) of each (length, depth); None where nothing ran."""
    cells: dict[tuple[int, float], list[bool]] = defaultdict(list)
    for row in rows:
        if row["method"] == method and row["variant"] == variant:
            cells[(int(row["length"]), float(row["depth"]))].append(row["passed"] == "True")
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    grid = [[(sum(cells[(n, d)]) / len(cells[(n, d)])) if (n, d) in cells else None for d in depths]
            for n in lengths]
    return lengths, depths, grid


def perplexity_table(rows: Iterable[Row], methods: Sequence[str] = ()) -> list[dict]:
    """One row per (method, length) over its documents (a book from one start offset each): the mean
    perplexity of each book, the mean over all documents, their sample standard deviation (None for one
    document), minimum and maximum."""
    groups: dict[tuple[str, int], dict[tuple[str, str], float]] = defaultdict(dict)
    shared: Counter[tuple[str, int]] = Counter()
    for row in rows:
        groups[(row["method"], int(row["length"]))][(row["book"], row.get("offset", "0"))] = float(row["ppl"])
        shared[(row["method"], int(row["length"]))] += bool(row.get("shared_from"))
    order = {m: i for i, m in enumerate(_order({k[0] for k in groups}, methods))}
    out = []
    for method, length in sorted(groups, key=lambda k: (order[k[0]], k[1])):
        documents = groups[(method, length)]
        values = list(documents.values())
        books = sorted({book for book, _ in documents})
        out.append({"method": method, "length": length, "documents": len(values),
                    **{f"ppl_{b}": statistics.fmean(v for (book, _), v in documents.items() if book == b)
                       for b in books},
                    "ppl": statistics.fmean(values), "ppl_sd": statistics.stdev(values) if len(values) > 1 else None,
                    "ppl_min": min(values), "ppl_max": max(values), "shared": shared[(method, length)]})
    return out


def perplexity_shown(row: Mapping) -> str:
    """A row of :func:`perplexity_table` as a table shows it: ``"25.74 ± 0.57 (6)"``, the mean, the sample
    standard deviation (absent for one document) and the number of documents, then ``shared`` as
    :func:`passkey_shown` says it."""
    spread = "" if row["ppl_sd"] is None else f" ± {row['ppl_sd']:.2f}"
    return f"{row['ppl']:.2f}{spread} ({row['documents']})" + _shared_note(row, "documents")


def short_context_table(rows: Iterable[Row], methods: Sequence[str] = (), baseline: str = "unscaled"
                        ) -> list[dict]:
    """One row per (method, length): windows, mean perplexity, change against ``baseline`` in percent,
    windows whose logprobs equal the baseline's bitwise, and the largest |window perplexity change|."""
    rows = list(rows)
    windows: dict[tuple[str, int], dict[tuple[str, str], Row]] = defaultdict(dict)
    for row in rows:
        windows[(row["method"], int(row["length"]))][(row["book"], row["window"])] = row
    order = {m: i for i, m in enumerate(_order({k[0] for k in windows}, methods))}
    out = []
    for method, length in sorted(windows, key=lambda k: (order[k[0]], k[1])):
        mine = windows[(method, length)]
        base = windows.get((baseline, length), {})
        ppl = statistics.fmean(float(r["ppl"]) for r in mine.values())
        common = [w for w in mine if w in base]
        entry = {"method": method, "length": length, "windows": len(mine), "ppl": ppl,
                 "delta_pct": None, "identical": None, "max_abs_delta_ppl": None}
        if common and len(common) == len(mine):
            base_ppl = statistics.fmean(float(base[w]["ppl"]) for w in common)
            entry["delta_pct"] = 100 * (ppl / base_ppl - 1)
            entry["identical"] = sum(mine[w]["logprobs_sha1"] == base[w]["logprobs_sha1"] for w in common)
            entry["max_abs_delta_ppl"] = max(abs(float(mine[w]["ppl"]) - float(base[w]["ppl"])) for w in common)
        out.append(entry)
    return out


def markdown(rows: Sequence[Mapping], columns: Sequence[str], headers: Sequence[str] | None = None,
             formats: Mapping[str, str] | None = None) -> str:
    """A GitHub Markdown table; ``formats`` maps a column to a format spec (None shows as a dash)."""
    formats = formats or {}
    headers = list(headers or columns)

    def cell(column: str, value) -> str:
        if value is None:
            return "–"
        return format(value, formats[column]) if column in formats else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pivot(rows: Sequence[Mapping], index: str, column: str, value: str) -> tuple[list, list, dict]:
    """``(index values, column values, {(i, c): value})`` keeping first-seen order of the index; a row
    without ``value`` (a partial grid: a book not yet run at that length) leaves its cell empty."""
    index_values: list = []
    column_values: set = set()
    table = {}
    for row in rows:
        if row[index] not in index_values:
            index_values.append(row[index])
        column_values.add(row[column])
        if row.get(value) is not None:
            table[(row[index], row[column])] = row[value]
    return index_values, sorted(column_values), table


def pivot_markdown(rows: Sequence[Mapping], index: str, column: str, value: str, *, fmt: str,
                   labels: Mapping[str, str] | None = None, column_label=str) -> str:
    """A Markdown table with one row per ``index`` value and one column per ``column`` value."""
    labels = labels or {}
    rows_, cols, table = pivot(rows, index, column, value)
    out = [{"_": labels.get(r, r), **{str(c): table.get((r, c)) for c in cols}} for r in rows_]
    return markdown(out, ["_", *map(str, cols)], [index, *map(column_label, cols)],
                    {str(c): fmt for c in cols})
