"""Turn outside question files into our Question schema, counting everything left out by its reason.

ForecastBench (question sets, each optionally with its resolution set; files, or folders holding them):

- Files are told apart by their top-level list (`questions` or `resolutions`), and a resolution set goes with the
  question set it names (`question_set`, else the same `forecast_due_date`). A question set without one imports
  without outcomes; a resolution set without its question set is counted, unused.

- Market sources (manifold, metaculus, polymarket, infer): one question each. `freeze_datetime` is the as-of date and
  `freeze_datetime_value`, a *string*, is the market probability then. A resolution row with `resolved: true` gives
  the outcome and the resolution date; one with `resolved: false` holds a later market value, not an outcome, so
  the question stays unresolved (resolution date: the market's close date) and the row is counted as unused.
- Dataset sources (acled, dbnomics, fred, wikipedia, yfinance) ask about a series on several resolution dates, and
  their `freeze_datetime_value` is a level (a price, an Elo rating), not a probability. Each (question, resolution
  date) with a resolved 0/1 outcome becomes its own question, id `source/id/date`, text with `{resolution_date}` and
  `{forecast_due_date}` filled in, the level stated in the background, and no market probability (they train with
  the outcome rewards only). Dates not resolved yet are skipped and counted, one per (question, date).
- Combination questions (list ids) are skipped. Ids are `source/id`, as ids are unique only within a source.
- Several sets: the same market is asked again every two weeks under the same id. A question is kept once, from the
  earliest set that has it (by forecast due date): its first as-of date and the market probability then, with that
  set's resolution; every later asking is skipped and counted. So a time split never sees one market on both sides.

JSONL / CSV: one question per row. Columns are named as the schema's fields (`rollout/questions.py`) unless mapped,
`field=column` (e.g. `text=question`, `market_prob=p`). Dates are ISO dates or datetimes (the date part is kept);
outcomes are 0/1, true/false or yes/no; an empty cell is a missing value. Columns that map to no field are ignored,
and reported once.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rollout.questions import ARROW_SCHEMA, Question, validate_rows

FB_MARKET_SOURCES = ("manifold", "metaculus", "polymarket", "infer")
FB_DATASET_SOURCES = ("acled", "dbnomics", "fred", "wikipedia", "yfinance")
FIELDS = tuple(ARROW_SCHEMA.names)


@dataclass
class ImportReport:
    imported: Counter = field(default_factory=Counter)
    """Questions written, per source."""
    skipped: Counter = field(default_factory=Counter)
    """Input rows not written, per reason (a ForecastBench dataset question counts once per resolution date)."""
    unused_resolutions: Counter = field(default_factory=Counter)
    """ForecastBench resolution rows that gave no outcome, per reason."""
    ignored_columns: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)
    """ForecastBench: each question set read, with the resolution set it was given (or none)."""

    def lines(self) -> list[str]:
        out = list(self.sets)
        out.append(f"imported {sum(self.imported.values())} questions: "
                   + (", ".join(f"{s or '(no source)'} {n}" for s, n in sorted(self.imported.items())) or "none"))
        if self.skipped:
            out.append(f"skipped {sum(self.skipped.values())}:")
            out += [f"  {n:6d}  {r}" for r, n in self.skipped.most_common()]
        if self.unused_resolutions:
            out.append(f"resolution rows giving no outcome {sum(self.unused_resolutions.values())}:")
            out += [f"  {n:6d}  {r}" for r, n in self.unused_resolutions.most_common()]
        if self.ignored_columns:
            out.append(f"ignored columns (no field maps to them): {', '.join(self.ignored_columns)}")
        return out


def _valid(rows: list[dict], report: ImportReport) -> list[Question]:
    """The candidate rows that validate; each bad one is counted once, by its first problem."""
    good, errors = validate_rows(rows)
    counted: set[int] = set()
    for e in errors:
        if e.row not in counted:
            counted.add(e.row)
            report.skipped[e.reason] += 1
    return good


def _finish(good: list[Question], report: ImportReport) -> tuple[list[Question], ImportReport]:
    report.imported.update(q.source for q in good)
    return good, report


def _na(v) -> str:
    """ForecastBench writes "N/A" for an empty text field."""
    return "" if v is None or str(v).strip() == "N/A" else str(v).strip()


def _date(v) -> dt.date | None:
    """An ISO date or datetime (its date part); None for empty or N/A. Raises ValueError otherwise."""
    if isinstance(v, dt.datetime):
        return v.date()
    if isinstance(v, dt.date):
        return v
    s = _na(v)
    return dt.datetime.fromisoformat(s).date() if s else None


def _market_prob(v) -> float | None:
    try:
        p = float(v)
    except (TypeError, ValueError):
        return None
    return p if 0.0 <= p <= 1.0 else None


def _load_json(path: Path, key: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: not a ForecastBench file (expected an object with a '{key}' list)")
    return data


def _fb_outcomes(resolutions: list[dict], report: ImportReport) -> dict[tuple[str, str], dict[dt.date, int]]:
    """(source, id) -> {resolution date: 0/1 outcome}, from the resolution rows that hold an outcome."""
    out: dict[tuple[str, str], dict[dt.date, int]] = {}
    for r in resolutions:
        if isinstance(r.get("id"), list):
            report.unused_resolutions["combination question (list id)"] += 1
        elif not r.get("resolved"):
            report.unused_resolutions["not resolved: resolved_to is a market value, not an outcome"] += 1
        elif r.get("resolved_to") not in (0, 1):
            report.unused_resolutions["resolved_to is not 0 or 1"] += 1
        else:
            try:
                day = _date(r["resolution_date"])
                out.setdefault((r["source"], str(r["id"])), {})[day] = int(r["resolved_to"])
            except (KeyError, ValueError):
                report.unused_resolutions["no readable source, id or resolution_date"] += 1
    return out


def _fb_files(paths) -> tuple[list[tuple[Path, dict]], dict[str, tuple[Path, dict]]]:
    """The question sets among `paths` (files, or folders: their .json files), in forecast-due-date order, and the
    resolution sets by the question set each goes with."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"file not found: {p}")
    questions, resolutions = [], {}
    for f in files:
        try:
            data = json.loads(f.read_text())
        except ValueError as e:
            raise ValueError(f"{f}: not JSON ({e})") from None
        kind = next((k for k in ("questions", "resolutions") if isinstance(data, dict)
                     and isinstance(data.get(k), list)), None)
        if kind is None:
            raise ValueError(f"{f}: not a ForecastBench file (expected an object with a 'questions' list, or a "
                             "'resolutions' list)")
        if kind == "questions":
            questions.append((f, data))
        elif resolutions.setdefault(_fb_set_key(data), (f, data))[0] != f:
            raise ValueError(f"{f} and {resolutions[_fb_set_key(data)][0]}: two resolution sets for the question set "
                             f"{_fb_set_key(data)!r}")
    if not questions:
        raise ValueError(f"no question set among {', '.join(map(str, files)) or 'the paths given'} (expected an "
                         "object with a 'questions' list)")
    return sorted(questions, key=lambda fd: (str(fd[1].get("forecast_due_date")), fd[0].name)), resolutions


def _fb_set_key(data: dict) -> str:
    """What pairs a resolution set with its question set: the question set's file name, else the due date."""
    return str(data.get("question_set") or data.get("forecast_due_date"))


def import_forecastbench(*paths: str | Path) -> tuple[list[Question], ImportReport]:
    """ForecastBench question sets with their resolution sets (files, or folders holding them), as one question
    list: each question once, from the earliest set that asks it (module docstring)."""
    question_sets, resolution_sets = _fb_files(paths)
    report, kept = ImportReport(), {}
    for path, qdata in question_sets:
        paired = resolution_sets.pop(_fb_set_key(qdata), None)
        outcomes = {} if paired is None else _fb_outcomes(paired[1]["resolutions"], report)
        good = _valid(_fb_rows(qdata, outcomes, report), report)
        report.sets.append(f"{path.name} + {paired[0].name if paired else 'no resolution set (no outcomes)'}: "
                           f"{len(good)} questions")
        for q in good:
            if q.id in kept:
                report.skipped["asked again in a later set: the earliest asking is kept"] += 1
            else:
                kept[q.id] = q
    for path, data in resolution_sets.values():
        report.unused_resolutions[f"no question set {_fb_set_key(data)!r} given with its resolution set"] += len(
            data["resolutions"])
    return _finish(list(kept.values()), report)


def _fb_rows(qdata: dict, outcomes: dict, report: ImportReport) -> list[dict]:
    """One question set's candidate rows (module docstring), its outcomes from its own resolution set."""
    used: set[tuple] = set()
    rows: list[dict] = []
    due = _na(qdata.get("forecast_due_date"))
    for fq in qdata["questions"]:
        source, qid = fq.get("source", ""), fq.get("id")
        if isinstance(qid, list):
            report.skipped["combination question (list id)"] += 1
            continue
        resolved = outcomes.get((source, str(qid)), {})
        try:
            as_of = _date(fq.get("freeze_datetime"))
        except ValueError:
            report.skipped["freeze_datetime: not a date"] += 1
            continue
        criteria = "\n\n".join(x for x in (_na(fq.get("resolution_criteria")),
                                           _na(fq.get("market_info_resolution_criteria"))) if x)
        base = dict(text=fq.get("question"), background=_na(fq.get("background")), resolution_criteria=criteria,
                    as_of=as_of, source=source, url=_na(fq.get("url")))
        if source in FB_MARKET_SOURCES:
            used.update((source, str(qid), day) for day in resolved)
            market = _market_prob(fq.get("freeze_datetime_value"))
            if market is None:
                report.skipped["market source: freeze_datetime_value is not a probability"] += 1
                continue
            if resolved:  # a market resolves once; should a set ever list two dates, the first is when it did
                day = min(resolved)
                rows.append(dict(base, id=f"{source}/{qid}", market_prob=market, outcome=resolved[day],
                                 resolution_date=day))
                continue
            try:
                close = _date(fq.get("market_info_close_datetime"))
            except ValueError:
                close = None
            rows.append(dict(base, id=f"{source}/{qid}", market_prob=market, resolution_date=close))
        elif source in FB_DATASET_SOURCES:
            dates = fq.get("resolution_dates")
            if not isinstance(dates, list) or not dates:
                report.skipped["dataset source: no resolution_dates list"] += 1
                continue
            level = f"Value on {as_of}: {_na(fq.get('freeze_datetime_value'))}"
            note = _na(fq.get("freeze_datetime_value_explanation"))
            background = "\n\n".join(x for x in (base["background"], f"{level} ({note})" if note else level) if x)
            for d in dates:
                try:
                    day = _date(d)
                except ValueError:
                    report.skipped["dataset source: resolution date is not a date"] += 1
                    continue
                if day not in resolved:
                    report.skipped["dataset source: no resolved outcome for this date "
                                   "(its value is a level, not a probability)"] += 1
                    continue
                used.add((source, str(qid), day))
                text = str(fq.get("question") or "").replace("{resolution_date}", str(day))
                rows.append(dict(base, id=f"{source}/{qid}/{day}", text=text.replace("{forecast_due_date}", due),
                                 background=background, resolution_date=day, outcome=resolved[day]))
        else:
            report.skipped[f"unknown source {source!r}"] += 1
    unmatched = sum(map(len, outcomes.values())) - len(used)
    if unmatched:
        report.unused_resolutions["no matching question (or date) in the question set"] += unmatched
    return rows


# ---------------------------------------------------------------------------------------------------- JSONL / CSV


def parse_mapping(items: list[str]) -> dict[str, str]:
    """`field=column` strings -> {field: column}; unknown fields are an error naming the valid ones."""
    mapping = {}
    for item in items:
        name, sep, column = item.partition("=")
        name, column = name.strip(), column.strip()
        if not sep or not name or not column:
            raise ValueError(f"--map {item!r}: expected FIELD=COLUMN")
        if name not in FIELDS:
            raise ValueError(f"--map {item!r}: unknown field {name!r}; fields: {', '.join(FIELDS)}")
        mapping[name] = column
    return mapping


_TRUE, _FALSE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no"}


def _convert(name: str, v):
    """A cell as the field's type. A ValueError says `field: problem`, naming no value: rows are counted by it."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if name in ("as_of", "resolution_date"):
        try:
            return _date(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: not an ISO date") from None
    if name in ("market_prob", "p_true"):
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: not a number") from None
    if name == "outcome":
        if isinstance(v, bool):
            return int(v)
        s = str(v).strip().lower()
        if s not in _TRUE | _FALSE:
            raise ValueError(f"{name}: outcome must be 0 or 1 (empty while unresolved)")
        return int(s in _TRUE)
    return v if isinstance(v, str) else str(v)


def import_rows(rows: list[dict], columns: list[str], mapping: dict[str, str],
                default_source: str) -> tuple[list[Question], ImportReport]:
    missing = {f: c for f, c in mapping.items() if c not in columns}
    if missing:
        raise ValueError(f"mapped columns not in the file: {missing}; its columns: {', '.join(columns)}")
    wanted = {f: mapping.get(f, f) for f in FIELDS}
    absent = [f for f in ("id", "text") if wanted[f] not in columns]
    if absent:
        raise ValueError(f"no column for required field(s) {absent}: map them, e.g. --map {absent[0]}=COLUMN; "
                         f"the file's columns: {', '.join(columns)}")
    report = ImportReport(ignored_columns=[c for c in columns if c not in wanted.values()])
    out: list[dict] = []
    for raw in rows:
        try:
            row = {f: _convert(f, raw[c]) for f, c in wanted.items() if c in raw}
        except ValueError as e:
            report.skipped[str(e)] += 1
            continue
        row = {k: v for k, v in row.items() if v is not None}
        row.setdefault("source", default_source)
        out.append(row)
    return _finish(_valid(out, report), report)


def import_jsonl(path: str | Path, mapping: dict[str, str] | None = None,
                 source: str | None = None) -> tuple[list[Question], ImportReport]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    rows, columns = [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object per line")
        rows.append(row)
        columns.update(dict.fromkeys(row))
    return import_rows(rows, list(columns), mapping or {}, path.stem if source is None else source)


def import_csv(path: str | Path, mapping: dict[str, str] | None = None,
               source: str | None = None) -> tuple[list[Question], ImportReport]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    return import_rows(rows, columns, mapping or {}, path.stem if source is None else source)
