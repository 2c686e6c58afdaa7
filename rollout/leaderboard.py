"""Published leaderboard figures, for the systems whose per-question forecasts are not published: ForecastBench's
baseline leaderboard (`leaderboard_baseline.csv`: a row per forecaster), read so that the rows a user names can be
printed beside our own scores.

Their numbers are theirs, on their questions. A row's market figures are over the market questions that forecaster
was scored on (`N market`: another set for every row, none of them ours): `Brier Market`, a difficulty-adjusted
Brier score, and `Market`, its Brier index, 100 (1 - sqrt(Brier)) (100: always right; 50: always 0.5), with its 95%
interval. Ours are plain Brier scores on the resolved market questions of our data, put on the same index: side by
side, never question by question.
"""

from __future__ import annotations

import csv
import difflib
import math
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("Model", "Model Organization", "Market", "N market", "Market 95% CI", "Brier Market")
DEFAULT_ROWS = ("Superforecaster median forecast", "Public median forecast", "Always 0.5")
"""Printed whatever is named: the human references ForecastBench keeps, and the uninformed forecaster."""


@dataclass(frozen=True)
class Row:
    model: str
    organization: str
    brier_index: float
    """`Market`: the Brier index on their market questions (higher is better)."""
    interval: str
    """`Market 95% CI`, as published."""
    brier: float
    """`Brier Market`: their difficulty-adjusted Brier score on market questions (lower is better)."""
    n: int
    """`N market`: how many market questions the row was scored on."""


def brier_index(brier: float) -> float:
    """ForecastBench's Brier index of a Brier score: 100 (1 - sqrt(Brier))."""
    return 100 * (1 - math.sqrt(brier))


def read_leaderboard(path: str | Path) -> dict[str, Row]:
    """Model name -> its row; a row whose market figures do not parse is an error naming its line and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"leaderboard not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a ForecastBench leaderboard: no column {', '.join(map(repr, missing))}")
        rows = {}
        for line, r in enumerate(reader, 2):  # the header is line 1
            try:
                rows[r["Model"]] = Row(r["Model"], r["Model Organization"], float(r["Market"]), r["Market 95% CI"],
                                       float(r["Brier Market"]), int(r["N market"]))
            except ValueError as e:
                raise ValueError(f"{path}:{line}: {r['Model']!r}: a market column does not parse ({e})") from None
    return rows


def pick(board: dict[str, Row], names: list[str]) -> list[Row]:
    """The named rows after the default ones, each once; a name not on the board is an error naming the nearest."""
    out = []
    for name in [*DEFAULT_ROWS, *names]:
        if name not in board:
            near = difflib.get_close_matches(name, list(board), n=3, cutoff=0.5)
            raise ValueError(f"--leaderboard-model {name!r} is not a row of the leaderboard"
                             + (f"; nearest: {', '.join(near)}" if near else ""))
        if board[name] not in out:
            out.append(board[name])
    return out


def format_rows(theirs: list[Row], ours: dict[str, dict], path: str, data: str) -> str:
    """Their rows, then ours ({name: mean_interval of the Brier on our resolved market questions}), each block saying
    whose numbers on whose questions they are."""
    width = max(24, *(len(r.model) for r in theirs), *map(len, ours))
    lines = [f"THEIRS: the ForecastBench leaderboard ({path}), on THEIR market questions (N market: another set "
             "for every row); Brier difficulty-adjusted",
             f"  {'forecaster':{width}s} {'Brier index [95% CI]':>24s} {'Brier':>8s} {'N market':>9s}"]
    lines += [f"  {r.model:{width}s} {f'{r.brier_index:.1f} {r.interval}':>24s} {r.brier:8.3f} {r.n:9d}"
              for r in theirs]
    lines += [f"OURS: on OUR resolved market questions ({data}); plain Brier, on the same index",
              f"  {'forecaster':{width}s} {'Brier index [95% CI]':>24s} {'Brier':>8s} {'n':>9s}"]
    for name, b in ours.items():
        if not b["n"]:
            lines.append(f"  {name:{width}s} {'-':>24s} {'-':>8s} {0:9d}")
            continue
        cell = f"{brier_index(b['mean']):.1f} [{brier_index(b['high']):.1f}, {brier_index(b['low']):.1f}]"
        lines.append(f"  {name:{width}s} {cell:>24s} {b['mean']:8.3f} {b['n']:9d}")
    lines.append("Brier index = 100 (1 - sqrt(Brier)): higher is better, 50 = always 0.5. The two blocks are scored on "
                 "different questions: read them side by side, not as one ranking.")
    return "\n".join(lines)
