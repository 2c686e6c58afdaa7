"""Row validation for the files the tools read (news corpora, cache snapshots): every bad row named by its number
and field, and a reason without values so skipped rows can be counted by it."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError


class RowError(ValueError):
    def __init__(self, row: int, field: str, msg: str, detail: str = ""):
        super().__init__(f"row {row}: {field}: {msg}{f' ({detail})' if detail else ''}")
        self.row, self.field, self.msg, self.detail = row, field, msg, detail

    @property
    def reason(self) -> str:
        return f"{self.field}: {self.msg}"


def validate_row(model: type[BaseModel], row: int, values: dict) -> tuple[BaseModel | None, list[RowError]]:
    """(the row as `model`, []) or (None, every problem of the row)."""
    try:
        return model.model_validate(values), []
    except ValidationError as err:
        out = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(row)"
            msg = "missing" if e["type"] == "missing" else e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            out.append(RowError(row, field, msg, "" if isinstance(got, dict) or e["type"] == "missing"
                                else f"got {got!r:.80}"))
        return None, out


def raise_row_errors(what: str, errors: list[RowError]) -> None:
    if errors:
        shown = "\n  ".join(str(e) for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{what}: {len(errors)} problems in {len({e.row for e in errors})} rows:\n  {shown}{more}")
