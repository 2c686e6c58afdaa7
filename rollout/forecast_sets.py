"""Read other systems' published forecasts, keyed by our question ids, counting every row that is not used.

ForecastBench forecast set: JSON with top-level `organization`, `model`, `question_set`, `forecast_due_date` and
`forecasts: [{id, source, direction, forecast, resolution_date, reasoning}]`. Ids follow `rollout/importers.py`:
a market question is `source/id` (one question each, so a resolution date, if given, is not needed), a dataset
question `source/id/YYYY-MM-DD` (one per resolution date, so its forecast must give one). Combination questions (a
list id, or a `direction`) ask about several questions at once and match none of ours: skipped and counted.

JSONL / CSV: one forecast per row, columns `id` (our ids) and `forecast`; other columns are ignored and listed.

A forecast must be a probability in [0, 1]; any other row is invalid and kept as a `RowError` naming its row, field
and value. Rows count from 1: the entry in `forecasts`, the JSONL line, the CSV line (the header is line 1). An id
forecast more than once is kept for none of its rows: which forecast is the system's own cannot be told, and scoring
the first would score the file's order. Matching against the questions (`coverage`) names the ids that match none.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# the importers' own readers, so that a forecast's dates and probabilities parse as a question's do
from rollout.importers import FB_DATASET_SOURCES, _date, _load_json, _market_prob
from tools.rows import RowError

SHOWN = 3
"""Problems named in a coverage line; summary.json names them all."""
FB_INFO = ("organization", "model", "question_set", "forecast_due_date")
COMBINATION = "combination question (list id or a direction): matches no single question"


@dataclass
class ForecastSet:
    path: str
    forecasts: dict[str, float] = field(default_factory=dict)
    """Question id -> probability, for every id forecast exactly once."""
    rows: int = 0
    info: dict = field(default_factory=dict)
    """A ForecastBench file's organization, model, question set and due date."""
    skipped: Counter = field(default_factory=Counter)
    """Rows that are valid but forecast no single question, per reason."""
    invalid: list[RowError] = field(default_factory=list)
    duplicates: dict[str, list[int]] = field(default_factory=dict)
    """Id -> the rows that forecast it, for ids forecast more than once (none of them is kept)."""
    ignored_columns: list[str] = field(default_factory=list)

    def coverage(self, ids: list[str]) -> dict:
        """How the set meets a question file (ids in file order): counts, and every unmatched or bad row named."""
        known = set(ids)
        unmatched = [i for i in self.forecasts if i not in known]
        return {"file": self.path, **self.info, "rows": self.rows, "questions": len(ids),
                "forecast": sum(i in self.forecasts for i in ids),
                "unmatched": len(unmatched), "unmatched_ids": unmatched,
                "invalid": len(self.invalid), "invalid_rows": [str(e) for e in self.invalid],
                "skipped": dict(self.skipped), "duplicates": self.duplicates, "ignored_columns": self.ignored_columns}


def coverage_line(name: str, c: dict) -> str:
    """One line per compared system: `claude: 480 of 500 questions forecast; 12 rows unmatched (first: ...); ...`."""
    def first(items: list) -> str:
        return "; ".join(map(str, items[:SHOWN])) + ("; ..." if len(items) > SHOWN else "")

    parts = [f"{name}: {c['forecast']} of {c['questions']} questions forecast"]
    if c["unmatched"]:
        parts.append(f"{c['unmatched']} rows unmatched (first: {first(c['unmatched_ids'])})")
    if c["invalid"]:
        parts.append(f"{c['invalid']} invalid ({first(c['invalid_rows'])})")
    if c["duplicates"]:
        dup = [f"{i} rows {', '.join(map(str, rows))}" for i, rows in c["duplicates"].items()]
        parts.append(f"{len(dup)} ids forecast more than once, none kept ({first(dup)})")
    parts += [f"{n} skipped: {reason}" for reason, n in c["skipped"].items()]
    if c["ignored_columns"]:
        parts.append(f"ignored columns: {', '.join(c['ignored_columns'])}")
    return "; ".join(parts)


def _probability(row: int, v) -> float:
    p = _market_prob(v)
    if p is None:
        raise RowError(row, "forecast", "not a probability in [0, 1]", f"got {v!r}")
    return p


def _present(row: int, name: str, v) -> str:
    if v is None or not str(v).strip():
        raise RowError(row, name, "missing")
    return str(v).strip()


def _fb_forecast(row: int, f) -> tuple[str, float] | None:
    """(our id, probability), or None for a combination question."""
    if not isinstance(f, dict):
        raise RowError(row, "(row)", "not an object", f"got {f!r}")
    if isinstance(f.get("id"), list) or f.get("direction") is not None:
        return None
    source, qid = _present(row, "source", f.get("source")), _present(row, "id", f.get("id"))
    if source not in FB_DATASET_SOURCES:  # a market is one question: its resolution date, if given, is not needed
        return f"{source}/{qid}", _probability(row, f.get("forecast"))
    try:
        day = _date(f.get("resolution_date"))
    except ValueError:
        raise RowError(row, "resolution_date", "not an ISO date", f"got {f.get('resolution_date')!r}") from None
    if day is None:
        raise RowError(row, "resolution_date", "missing (a dataset question is forecast per resolution date)")
    return f"{source}/{qid}/{day}", _probability(row, f.get("forecast"))


def _table_forecast(row: int, r: dict) -> tuple[str, float]:
    return _present(row, "id", r.get("id")), _probability(row, r.get("forecast"))


def _collect(fs: ForecastSet, rows: list[tuple[int, object]], parse) -> ForecastSet:
    """Parse each (row number, raw row); keep the ids forecast exactly once, count and name everything else."""
    seen: dict[str, list[tuple[int, float]]] = {}
    for n, raw in rows:
        try:
            got = parse(n, raw)
        except RowError as e:
            fs.invalid.append(e)
            continue
        if got is None:
            fs.skipped[COMBINATION] += 1
            continue
        seen.setdefault(got[0], []).append((n, got[1]))
    fs.rows = len(rows)
    fs.forecasts = {i: found[0][1] for i, found in seen.items() if len(found) == 1}
    fs.duplicates = {i: [n for n, _ in found] for i, found in seen.items() if len(found) > 1}
    return fs


def _columns(path: Path, columns: list[str]) -> list[str]:
    """The columns ignored; raises if `id` or `forecast` is missing."""
    absent = [c for c in ("id", "forecast") if c not in columns]
    if absent:
        raise ValueError(f"{path}: no column {' or '.join(absent)} (a forecast file needs id and forecast); "
                         f"its columns: {', '.join(columns) or 'none'}")
    return [c for c in columns if c not in ("id", "forecast")]


def read_forecast_set(path: str | Path) -> ForecastSet:
    """A ForecastBench forecast set (.json), or a JSONL / CSV file of id and forecast."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    fs = ForecastSet(str(path))
    if path.suffix == ".json":
        data = _load_json(path, "forecasts")
        fs.info = {k: data.get(k) for k in FB_INFO}
        return _collect(fs, list(enumerate(data["forecasts"], 1)), _fb_forecast)
    if path.suffix == ".jsonl":
        rows, columns = [], {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            rows.append((n, row if isinstance(row, dict) else line))  # the line itself names a bad row
            columns.update(dict.fromkeys(row if isinstance(row, dict) else ()))
        fs.ignored_columns = _columns(path, list(columns))

        def parse(n: int, row: dict | str) -> tuple[str, float]:
            if isinstance(row, str):
                raise RowError(n, "(row)", "not a JSON object", f"got {row[:60]!r}")
            return _table_forecast(n, row)

        return _collect(fs, rows, parse)
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(enumerate(reader, 2))
            fs.ignored_columns = _columns(path, list(reader.fieldnames or []))
        return _collect(fs, rows, _table_forecast)
    raise ValueError(f"{path}: expected a ForecastBench forecast set (.json) or a .jsonl / .csv of id and forecast")
