"""One question schema for real and synthetic questions, as a pydantic model and as the matching Arrow schema.

A question is asked *as of* a date: the model (and its tools) may know the world only up to then. Real questions
carry the market probability on that date and, once resolved, the outcome; synthetic ones carry their exact
aleatoric probability `p_true` as well.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from tools.rows import RowError, raise_row_errors, validate_row


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    text: str
    background: str = ""
    resolution_criteria: str = ""
    as_of: dt.date | None = None
    """The forecast date: what the model may know."""
    resolution_date: dt.date | None = None
    market_prob: float | None = None
    """Market / community probability at the as-of date (for synthetic questions: p*, or p* plus noise)."""
    outcome: int | None = None
    """Resolved outcome, or None while unresolved."""
    source: str = ""
    url: str = ""
    p_true: float | None = None
    """Synthetic only: the known aleatoric probability."""

    # Messages carry no values, so importers can count skipped rows by them; RowError adds the value.
    @field_validator("id", "text", mode="before")
    @classmethod
    def _present(cls, v):
        if v is None:
            raise ValueError("missing")
        if isinstance(v, str) and not v.strip():
            raise ValueError("blank")
        return v

    @field_validator("market_prob", "p_true")
    @classmethod
    def _probability(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:  # NaN fails this too
            raise ValueError("probability outside [0, 1]")
        return v

    @field_validator("outcome")
    @classmethod
    def _binary(cls, v: int | None) -> int | None:
        if v not in (None, 0, 1):
            raise ValueError("outcome must be 0 or 1 (empty while unresolved)")
        return v

    @field_validator("resolution_date")
    @classmethod
    def _after_as_of(cls, v: dt.date | None, info: ValidationInfo) -> dt.date | None:
        as_of = info.data.get("as_of")
        if v is not None and as_of is not None and as_of > v:
            raise ValueError("as-of date is after the resolution date")
        return v


ARROW_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("background", pa.string()),
    pa.field("resolution_criteria", pa.string()),
    pa.field("as_of", pa.date32()),
    pa.field("resolution_date", pa.date32()),
    pa.field("market_prob", pa.float64()),
    pa.field("outcome", pa.int8()),
    pa.field("source", pa.string()),
    pa.field("url", pa.string()),
    pa.field("p_true", pa.float64()),
])


def to_table(questions: list[Question]) -> pa.Table:
    cols = {f.name: [getattr(q, f.name) for q in questions] for f in ARROW_SCHEMA}
    return pa.table(cols, schema=ARROW_SCHEMA)


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def write_parquet(questions: list[Question], path: str | Path) -> None:
    write_table(to_table(questions), path)


def validate_rows(rows: list[dict]) -> tuple[list[Question], list[RowError]]:
    """Every problem of every row (numbered from 0), including ids that repeat; valid rows come back as Questions."""
    good, errors, seen = [], [], {}
    for i, row in enumerate(rows):
        q, problems = validate_row(Question, i, row)
        if problems:
            errors.extend(problems)
            continue
        if q.id in seen:
            errors.append(RowError(i, "id", "duplicate id", f"{q.id!r}, first at row {seen[q.id]}"))
            continue
        seen[q.id] = i
        good.append(q)
    return good, errors


def check_parquet(path: str | Path) -> tuple[list[Question], list[RowError]]:
    """The valid questions and every row error; a missing file or missing columns raise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    table = pq.read_table(path)
    missing = {"id", "text"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    # A null in an optional column means "not given" (other writers leave empty strings null); id and text must be set.
    rows = [{k: v for k, v in r.items() if k in ARROW_SCHEMA.names and (v is not None or k in ("id", "text"))}
            for r in table.to_pylist()]
    return validate_rows(rows)


def read_parquet(path: str | Path) -> list[Question]:
    """Load and validate; any bad row is an error naming its number and field."""
    good, errors = check_parquet(path)
    raise_row_errors(str(path), errors)
    return good
