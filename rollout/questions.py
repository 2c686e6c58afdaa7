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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    text: str = Field(min_length=1)
    background: str = ""
    resolution_criteria: str = ""
    as_of: dt.date | None = None
    """The forecast date: what the model may know."""
    resolution_date: dt.date | None = None
    market_prob: float | None = Field(None, ge=0.0, le=1.0)
    """Market / community probability at the as-of date (for synthetic questions: p*, or p* plus noise)."""
    outcome: int | None = Field(None, ge=0, le=1)
    """Resolved outcome, or None while unresolved."""
    source: str = ""
    url: str = ""
    p_true: float | None = Field(None, ge=0.0, le=1.0)
    """Synthetic only: the known aleatoric probability."""

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is blank")
        return v

    @model_validator(mode="after")
    def _dates_in_order(self) -> "Question":
        if self.as_of and self.resolution_date and self.as_of > self.resolution_date:
            raise ValueError(f"as_of {self.as_of} is after resolution_date {self.resolution_date}")
        return self


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


def write_parquet(questions: list[Question], path: str | Path) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(to_table(questions), tmp)
    tmp.replace(path)


class RowError(ValueError):
    def __init__(self, row: int, field: str, msg: str):
        super().__init__(f"row {row}: {field}: {msg}")
        self.row, self.field, self.msg = row, field, msg


def _row_errors(row: int, err: ValidationError) -> list[RowError]:
    return [RowError(row, ".".join(str(p) for p in e["loc"]) or "(row)", e["msg"]) for e in err.errors()]


def validate_rows(rows: list[dict]) -> tuple[list[Question], list[RowError]]:
    """Every problem of every row (numbered from 0), including ids that repeat; valid rows come back as Questions."""
    good, errors, seen = [], [], {}
    for i, row in enumerate(rows):
        try:
            q = Question.model_validate(row)
        except ValidationError as e:
            errors.extend(_row_errors(i, e))
            continue
        if q.id in seen:
            errors.append(RowError(i, "id", f"duplicate id {q.id!r} (first at row {seen[q.id]})"))
            continue
        seen[q.id] = i
        good.append(q)
    return good, errors


def read_parquet(path: str | Path) -> list[Question]:
    """Load and validate; any bad row is an error naming its number and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    table = pq.read_table(path)
    missing = {"id", "text"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    rows = [{k: v for k, v in r.items() if k in ARROW_SCHEMA.names} for r in table.to_pylist()]
    good, errors = validate_rows(rows)
    if errors:
        shown = "\n  ".join(str(e) for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{path}: {len(errors)} bad rows:\n  {shown}{more}")
    return good
