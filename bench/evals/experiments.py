"""The three experiments of the evidence issue, as grids of cells plus their reports.

- ``passkey``: passkey retrieval (the paper's prompt and a real-prose haystack) per method, length,
  needle depth and seed; accuracy tables and a length x depth heatmap per method.
- ``perplexity``: perplexity against context length on the two novels, the paper's truncated-document
  protocol (each book cut to the length and scored once); a Figure-1-style plot, a Table-2-style table.
- ``short-context``: perplexity at 1k..8k on non-overlapping windows (from token 2000 of a book) for
  static YaRN at factors 2, 4, 8 against the plugin, which runs these at scale 1.

Each has a grid per mode (``tiny`` for the test suite, ``quick``, ``full``); see :data:`GRIDS`.
Cell lengths follow :mod:`bench.evals.inputs` (planned context = prompt + max_tokens).
"""

from __future__ import annotations

import array
import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path

from bench.evals import plots, scoring
from bench.evals.inputs import (
    PERPLEXITY_NEW_TOKENS,
    passkey_prompt,
    read_book,
    scored,
    truncated_document,
    window_count,
    windows,
)
from bench.evals.methods import L, METHODS, Method, get_methods
from bench.evals.runner import Cell
from bench.evals.store import CellStore
from server.passkey import MAX_NEW_TOKENS, draw, parse_answer

ALL_METHODS = ("unscaled", "yarn-x8", "yarn-fit", "linear-x8", "ntk-x8", "dynamic-ntk", "dynamic-yarn")
# The policy question: stock static YaRN x8 against ropeserve's candidate policies (rope_ext.policy).
POLICY_METHODS = ("yarn-x8", "dynamic-yarn", "dynamic-yarn-headroom", "dynamic-yarn-fine")
SHORT_OFFSET = 2000  # windows start at this token of the book (past the front matter)
LABELS = {name: m.label for name, m in METHODS.items()}


@dataclasses.dataclass(frozen=True)
class Grid:
    """What one run of an experiment covers."""

    methods: tuple[str, ...]
    lengths: tuple[int, ...]
    books: tuple[str, ...] = ("katrine",)
    depths: tuple[float, ...] = ()
    seeds: int = 1  # seeds base .. base + seeds - 1
    variants: tuple[str, ...] = ()
    budget: int = 0  # short-context: tokens scored per length and book (windows = budget // length)
    offsets: tuple[int, ...] = (0,)  # perplexity: the token each document starts at in its book
    variant_lengths: tuple[tuple[str, tuple[int, ...]], ...] = ()  # passkey: a variant's own lengths

    def lengths_of(self, variant: str) -> tuple[int, ...]:
        return dict(self.variant_lengths).get(variant, self.lengths)


def _depths(*tenths: int) -> tuple[float, ...]:
    return tuple(round(t / 10, 1) for t in tenths)


GRIDS: dict[str, dict[str, Grid]] = {
    "passkey": {
        "tiny": Grid(("unscaled", "dynamic-yarn"), (512,), depths=_depths(5), variants=("paper", "prose")),
        # 10 trials a cell: 5 depths x 2 seeds; the prose haystack at 16k only.
        "decide": Grid(POLICY_METHODS, (12288, 16384, 24576), depths=_depths(1, 3, 5, 7, 9), seeds=2,
                       variants=("paper", "prose"), variant_lengths=(("prose", (16384,)),)),
        "quick": Grid(("unscaled", "yarn-x8", "dynamic-yarn"), (4096, 8192, 16384), depths=_depths(2, 8),
                      variants=("paper", "prose")),
        "full": Grid(ALL_METHODS, (4096, 8192, 16384, 32768, 65536), depths=_depths(*range(1, 10)),
                     seeds=4, variants=("paper", "prose")),
    },
    "perplexity": {
        "tiny": Grid(("unscaled", "dynamic-yarn"), (512, 1024)),
        "decide": Grid((*POLICY_METHODS, "dynamic-ntk"), (10240, 12288, 16384, 24576, 32768),
                       books=("katrine", "news-from-nowhere"), offsets=(0, 25000, 50000)),
        "quick": Grid(ALL_METHODS, (1024, 2048, 4096, 8192, 16384)),
        "full": Grid(ALL_METHODS, (1024, 2048, 4096, 8192, 16384, 32768, 65536),
                     books=("katrine", "news-from-nowhere")),
    },
    "short-context": {
        "tiny": Grid(("unscaled", "dynamic-yarn"), (512, 1024), budget=1024),
        "quick": Grid(("unscaled", "yarn-x2", "yarn-x4", "yarn-x8", "dynamic-yarn"), (1024, 2048, 4096, 8192),
                      budget=8192),
        "full": Grid(("unscaled", "yarn-x2", "yarn-x4", "yarn-x8", "dynamic-ntk", "dynamic-yarn"),
                     (1024, 2048, 4096, 8192), books=("katrine", "news-from-nowhere"), budget=32768),
    },
}


class Corpus:
    """The model's tokenizer and the books' token ids (tokenized once, on first use)."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.bos = self.tokenizer.bos_token_id
        self.passkey_prompts: dict[tuple, array.array] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @functools.cache
    def book_tokens(self, name: str) -> array.array:
        return array.array("i", self.encode(read_book(name)))


def _perplexity_finish(engine: str, scale: float):
    def finish(result) -> dict:
        values = scoring.perplexity_values(scored(result.prompt_logprobs))
        return {"engine": engine, "scale": scale, **values, "seconds": round(result.seconds, 3)}
    return finish


def _scoring_request(prompt: Sequence[int], extra_args: dict | None = None):
    from server.offline import Request

    return Request(prompt_token_ids=list(prompt), max_tokens=PERPLEXITY_NEW_TOKENS, logprobs=None,
                   prompt_logprobs=0, extra_args=extra_args)


SHARED_NOTE = ("*shared*: the same computation (engine, prompt and factor) as another method's stored cell, "
               "computed once; `shared_from` in cells.csv names that method.")


def _forced(method: Method, length: int) -> float | None:
    """The factor a cell's request asks for (part of its input: cells on one engine that ask for the same
    factor with the same prompt are one computation), or None."""
    extra = method.extra_args(length)
    return None if extra is None else extra["rope_factor"]


class Experiment:
    name: str
    title: str
    key_fields: tuple[str, ...]
    value_fields: tuple[str, ...]

    def store(self, out: Path) -> CellStore:
        return CellStore(out / self.name / "cells.csv", self.key_fields, self.value_fields)

    def cells(self, grid: Grid, corpus: Corpus, *, dtype: str, seed: int) -> list[Cell]:
        raise NotImplementedError

    def report(self, rows: list[dict], grid: Grid, out: Path, mode: str) -> list[Path]:
        raise NotImplementedError


class Passkey(Experiment):
    name = "passkey"
    title = "Passkey retrieval"
    key_fields = ("method", "variant", "length", "depth", "seed", "dtype")
    value_fields = ("engine", "scale", "prompt_tokens", "key", "answer", "passed", "output", "seconds",
                    "shared_from")

    @staticmethod
    def _prompt(corpus: Corpus, variant: str, length: int, depth: float, seed: int) -> list[int]:
        # Cached on the corpus, never on this module-level instance: prompts are token ids of one tokenizer.
        cache = corpus.passkey_prompts
        input_id = (variant, length, depth, seed)
        if input_id not in cache:
            ids, _ = passkey_prompt(variant, length, depth, seed, corpus.encode, corpus.book_tokens)
            cache[input_id] = array.array("i", ids)
        return list(cache[input_id])

    def cells(self, grid: Grid, corpus: Corpus, *, dtype: str, seed: int) -> list[Cell]:
        from server.offline import Request

        cells = []
        for method in get_methods(grid.methods):
            for variant in grid.variants:
                for length in grid.lengths_of(variant):
                    for depth in grid.depths:
                        for s in range(seed, seed + grid.seeds):
                            engine = method.engine_for(length)
                            key = draw(s, depth)[0]

                            def build(v=variant, n=length, d=depth, s=s, extra=method.extra_args(length)):
                                return Request(prompt_token_ids=self._prompt(corpus, v, n, d, s),
                                               max_tokens=MAX_NEW_TOKENS, logprobs=None, extra_args=extra)

                            def finish(result, key=key, engine=engine.name, scale=method.scale(length)):
                                answer = parse_answer(result.text)
                                return {"engine": engine, "scale": scale, "prompt_tokens": result.num_prompt_tokens,
                                        "key": key, "answer": "" if answer is None else answer,
                                        "passed": answer == key, "output": json.dumps(result.text),
                                        "seconds": round(result.seconds, 3)}

                            cells.append(Cell(
                                key={"method": method.name, "variant": variant, "length": length, "depth": depth,
                                     "seed": s, "dtype": dtype},
                                engine=engine, input_id=("passkey", variant, length, depth, s,
                                                         _forced(method, length)),
                                context=length, build=build, finish=finish))
        return cells

    def report(self, rows, grid, out, mode):
        folder = out / self.name
        table = scoring.passkey_accuracy(rows, grid.methods)
        paths = [_write_csv(folder / f"{mode}_accuracy.csv", table,
                            ("method", "variant", "length", "cells", "passed", "accuracy", "low", "high",
                             "shared"))]
        text = [f"# {self.title} ({mode})\n\n{SHARED_NOTE}\n"]
        for variant in grid.variants:
            part = [r for r in table if r["variant"] == variant]
            shown = [{**r, "shown": scoring.passkey_shown(r)} for r in part]
            text += [f"\n## {variant} haystack: passed / cells [Wilson 95 % interval]\n\n",
                     scoring.pivot_markdown(shown, "method", "length", "shown", fmt="", labels=LABELS,
                                            column_label=_length_label)]
            paths += _try_plot(plots.passkey_accuracy_lines, table, grid.methods, variant,
                               folder / f"{mode}_accuracy_{variant}.png", labels=LABELS,
                               title=f"Passkey retrieval, {variant} haystack ({mode})")
            png = folder / f"{mode}_heatmap_{variant}.png"
            paths += _try_plot(plots.passkey_heatmaps, [r for r in rows], grid.methods, variant, png,
                               labels=LABELS, title=f"Passkey retrieval, {variant} haystack ({mode}): "
                                                    "accuracy over seeds")
        paths.append(_write_text(folder / f"{mode}_accuracy.md", "".join(text)))
        return paths


class Perplexity(Experiment):
    name = "perplexity"
    title = "Perplexity against context length (truncated documents)"
    key_fields = ("method", "book", "offset", "length", "dtype")
    value_fields = ("engine", "scale", "scored_tokens", "nll_sum", "ppl", "logprobs_sha1", "seconds",
                    "shared_from")  # the method whose stored cell was the same computation, or empty

    def cells(self, grid, corpus, *, dtype, seed):
        cells = []
        for method in get_methods(grid.methods):
            for book in grid.books:
                for offset in grid.offsets:
                    for length in grid.lengths:
                        engine = method.engine_for(length)
                        cells.append(Cell(
                            key={"method": method.name, "book": book, "offset": offset, "length": length,
                                 "dtype": dtype},
                            engine=engine, input_id=("document", book, offset, length, _forced(method, length)),
                            context=length,
                            build=lambda b=book, o=offset, n=length, extra=method.extra_args(length): _scoring_request(
                                truncated_document(corpus.book_tokens(b), n, corpus.bos, offset=o), extra),
                            finish=_perplexity_finish(engine.name, method.scale(length))))
        return cells

    def report(self, rows, grid, out, mode):
        folder = out / self.name
        table = scoring.perplexity_table(rows, grid.methods)
        books = sorted({r["book"] for r in rows})
        columns = ("method", "length", "documents", *[f"ppl_{b}" for b in books], "ppl", "ppl_sd", "ppl_min",
                   "ppl_max", "shared")
        paths = [_write_csv(folder / f"{mode}_perplexity.csv", table, columns)]
        shown = [{**r, "shown": scoring.perplexity_shown(r)} for r in table]
        text = [f"# {self.title} ({mode})\n\n{SHARED_NOTE}\n\n## Mean ± sample standard deviation (documents) over "
                f"{len(books)} book(s): {', '.join(books)}\n\n",
                scoring.pivot_markdown(shown, "method", "length", "shown", fmt="", labels=LABELS,
                                       column_label=_length_label)]
        if len(books) > 1:
            for book in books:
                text += [f"\n## {book}\n\n", scoring.pivot_markdown(table, "method", "length", f"ppl_{book}",
                                                                    fmt=".2f", labels=LABELS,
                                                                    column_label=_length_label)]
        paths.append(_write_text(folder / f"{mode}_perplexity.md", "".join(text)))
        paths += _try_plot(plots.perplexity_lines, table, grid.methods, folder / f"{mode}_perplexity.png",
                           labels=LABELS, original_context=L,
                           title=f"Perplexity vs context, truncated documents ({', '.join(books)}; {mode})")
        return paths


class ShortContext(Experiment):
    name = "short-context"
    title = "Short-context fidelity: perplexity at or below L"
    key_fields = ("method", "book", "length", "window", "dtype")
    value_fields = Perplexity.value_fields

    def cells(self, grid, corpus, *, dtype, seed):
        cells = []
        for method in get_methods(grid.methods):
            for book in grid.books:
                for length in grid.lengths:
                    count = window_count(length, grid.budget, len(corpus.book_tokens(book)), SHORT_OFFSET)
                    engine = method.engine_for(length)
                    for w in range(count):
                        cells.append(Cell(
                            key={"method": method.name, "book": book, "length": length, "window": w,
                                 "dtype": dtype},
                            engine=engine, input_id=("window", book, length, w, _forced(method, length)),
                            context=length,
                            build=lambda b=book, n=length, w=w, extra=method.extra_args(length): _scoring_request(
                                windows(corpus.book_tokens(b), n, w + 1, offset=SHORT_OFFSET, bos=corpus.bos)[w],
                                extra),
                            finish=_perplexity_finish(engine.name, method.scale(length))))
        return cells

    def report(self, rows, grid, out, mode):
        folder = out / self.name
        table = scoring.short_context_table(rows, grid.methods)
        columns = ("method", "length", "windows", "ppl", "delta_pct", "identical", "max_abs_delta_ppl")
        paths = [_write_csv(folder / f"{mode}_short_context.csv", table, columns)]
        books = sorted({r["book"] for r in rows})
        ident = [{**r, "shown": "–" if r["identical"] is None else f"{r['identical']}/{r['windows']}"}
                 for r in table if r["method"] != "unscaled"]
        text = [f"# {self.title} ({mode}; {', '.join(books)}; windows from token {SHORT_OFFSET})\n\n"
                "## Perplexity (mean over windows)\n\n",
                scoring.pivot_markdown(table, "method", "length", "ppl", fmt=".3f", labels=LABELS,
                                       column_label=_length_label),
                "\n## Change against the unscaled model (%)\n\n",
                scoring.pivot_markdown([r for r in table if r["method"] != "unscaled"], "method", "length",
                                       "delta_pct", fmt="+.2f", labels=LABELS, column_label=_length_label),
                "\n## Windows whose logprobs equal the unscaled model's bit for bit\n\n",
                scoring.pivot_markdown(ident, "method", "length", "shown", fmt="", labels=LABELS,
                                       column_label=_length_label)]
        paths.append(_write_text(folder / f"{mode}_short_context.md", "".join(text)))
        paths += _try_plot(plots.short_context_lines, table, grid.methods, folder / f"{mode}_short_context.png",
                           labels=LABELS, title=f"Perplexity change vs unscaled at <= L ({', '.join(books)}; {mode})")
        return paths


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (Passkey(), Perplexity(), ShortContext())}


def _length_label(n) -> str:
    n = int(n)
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _write_csv(path: Path, rows, columns) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return path


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _try_plot(fn, *args, **kwargs) -> list[Path]:
    """Plot when matplotlib is installed (``pip install matplotlib``); tables are written either way."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    return [fn(*args, **kwargs)]
