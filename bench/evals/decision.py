"""The evidence issue's rule for the default scale policy, applied to the decide grid's tables.

A candidate policy qualifies when its grid is complete past L (every passkey and perplexity cell the
baseline has, with as many trials and documents) and it is nowhere worse than the baseline (stock static
YaRN x8) beyond the intervals: a passkey cell is worse when its Wilson 95 % interval lies wholly below the
baseline's, a perplexity point when its mean minus its spread (sample standard deviation over the
documents) lies above the baseline's mean plus its spread. Every candidate is exact at or below L by
construction (rope_ext.policy runs requests that fit L unscaled; the real-engine tests prove it). Of the
qualifiers, the choice is the one at least as good as each other on both means past L (passkey accuracy
pooled over its trials, mean perplexity over the lengths) and better on at least one; when the two
measures disagree, the better mean perplexity: at ten trials a cell the passkey intervals are about 0.3
wide either side, while six documents' perplexity separates policies by more than their spread (this
tie-break was fixed before the grid's last cells were run)::

    result = decide(passkey_accuracy(rows), perplexity_table(rows), candidates=["dynamic-yarn", ...])
    print(markdown(result, labels))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path


@dataclasses.dataclass
class Standing:
    """One candidate against the baseline."""

    method: str
    missing: list[str]  # cells past L the baseline has and the candidate lacks (or has fewer trials in)
    worse: list[str]  # cells where it is worse than the baseline beyond the intervals
    passkey: float | None  # pooled accuracy past L
    perplexity: float | None  # mean over the lengths past L of the mean perplexity

    @property
    def qualifies(self) -> bool:
        return not self.missing and not self.worse


@dataclasses.dataclass
class Decision:
    baseline: str
    standings: list[Standing]
    choice: str | None
    reason: str


def _beats(a: Standing, b: Standing) -> bool:
    """``a`` at least as good as ``b`` on both means and better on one."""
    at_least = a.passkey >= b.passkey and a.perplexity <= b.perplexity
    return at_least and (a.passkey > b.passkey or a.perplexity < b.perplexity)


def decide(accuracy: Sequence[Mapping], perplexity: Sequence[Mapping], *, candidates: Sequence[str],
           original_max_position: int, baseline: str = "yarn-x8") -> Decision:
    """The rule of the module docstring over rows of ``scoring.passkey_accuracy`` and
    ``scoring.perplexity_table``."""
    past = original_max_position
    keys = {("passkey", r["variant"], r["length"]): r for r in accuracy
            if r["method"] == baseline and r["length"] > past}
    keys |= {("perplexity", "", r["length"]): r for r in perplexity
             if r["method"] == baseline and r["length"] > past}
    rows = {("passkey", r["variant"], r["length"], r["method"]): r for r in accuracy}
    rows |= {("perplexity", "", r["length"], r["method"]): r for r in perplexity}
    standings = []
    for method in candidates:
        missing, worse, passed, trials, means = [], [], 0, 0, []
        for (measure, variant, length), base in sorted(keys.items()):
            name = f"{measure} {variant + ' ' if variant else ''}{length // 1024}k"
            row = rows.get((measure, variant, length, method))
            count = "cells" if measure == "passkey" else "documents"
            if row is None or row[count] < base[count]:
                missing.append(name)
                continue
            if measure == "passkey":
                passed, trials = passed + row["passed"], trials + row["cells"]
                if row["high"] < base["low"]:
                    worse.append(name)
            else:
                means.append(row["ppl"])
                if row["ppl"] - (row["ppl_sd"] or 0.0) > base["ppl"] + (base["ppl_sd"] or 0.0):
                    worse.append(name)
        standings.append(Standing(method, missing, worse, passed / trials if trials else None,
                                  sum(means) / len(means) if means else None))
    qualified = [s for s in standings if s.qualifies]
    best = [s for s in qualified if all(_beats(s, o) for o in qualified if o is not s)]
    if not qualified:
        return Decision(baseline, standings, None, "no candidate qualifies")
    if len(qualified) == 1:
        return Decision(baseline, standings, qualified[0].method, "the only candidate that qualifies")
    if best:
        return Decision(baseline, standings, best[0].method,
                        "qualifies, and is at least as good as every other qualifier on both means and better on one")
    lowest = min(qualified, key=lambda s: s.perplexity)
    return Decision(baseline, standings, lowest.method, "the qualifiers' means disagree (one better in passkey, "
                                                        "another in perplexity): the lower mean perplexity")


def markdown(decision: Decision, labels: Mapping[str, str]) -> str:
    """The decision and the table that made it."""
    lines = ["| policy | complete past L | worse than the baseline beyond the intervals | passkey, pooled past L "
             "| mean perplexity past L | qualifies |", "|---|---|---|---:|---:|---|"]
    for s in decision.standings:
        complete = "yes" if not s.missing else "no: " + ", ".join(s.missing)
        passkey = "–" if s.passkey is None else f"{s.passkey:.3f}"
        perplexity = "–" if s.perplexity is None else f"{s.perplexity:.2f}"
        lines.append(f"| {labels.get(s.method, s.method)} | {complete} | {', '.join(s.worse) or 'nowhere'} "
                     f"| {passkey} | {perplexity} | {'yes' if s.qualifies else 'no'} |")
    choice = labels.get(decision.choice, decision.choice) if decision.choice else "none"
    return (f"Baseline: {labels.get(decision.baseline, decision.baseline)}.\n\n" + "\n".join(lines)
            + f"\n\n**Choice: {choice}** ({decision.reason}).\n")


def write_report(passkey_rows: Sequence[Mapping], perplexity_rows: Sequence[Mapping], out: Path) -> Path:
    """``out/decide.md``: the decision over the decide grid's policies from the stored cells."""
    from bench.evals import scoring
    from bench.evals.experiments import LABELS, POLICY_METHODS, SHARED_NOTE
    from bench.evals.methods import L

    baseline, *candidates = POLICY_METHODS
    decision = decide(scoring.passkey_accuracy(passkey_rows), scoring.perplexity_table(perplexity_rows),
                      candidates=candidates, original_max_position=L, baseline=baseline)
    path = out / "decide.md"
    path.write_text("# The default policy, by the evidence issue's rule (bench/evals/decision.py)\n\n"
                    f"{SHARED_NOTE} Shared cells count as the method's own.\n\n" + markdown(decision, LABELS),
                    encoding="utf-8")
    return path
