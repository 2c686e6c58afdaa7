import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster import cli
from rollout import questions as qio
from rollout.questions import ARROW_SCHEMA, Question

D = dt.date

# row number -> (field the error names, what is wrong)
BAD = {
    1: ("market_prob", dict(market_prob=1.5)),
    2: ("p_true", dict(p_true=-0.1)),
    3: ("resolution_date", dict(as_of=D(2024, 5, 2), resolution_date=D(2024, 5, 1))),
    4: ("id", dict(id="q0")),            # duplicate of row 0
    5: ("text", dict(text="   ")),       # blank
    6: ("text", dict(text=None)),        # missing
    7: ("outcome", dict(outcome=2)),
    8: ("market_prob", dict(market_prob=float("nan"))),
}


def _rows():
    rows = []
    for i in range(10):
        row = {f: None for f in ARROW_SCHEMA.names}
        row.update(id=f"q{i}", text=f"Will thing {i} happen?", as_of=D(2024, 1, 1), resolution_date=D(2024, 6, 1),
                   market_prob=0.4, outcome=1)
        row.update(BAD.get(i, ("", {}))[1])
        rows.append(row)
    return rows


@pytest.fixture
def bad_file(tmp_path):
    schema = pa.schema([f.with_nullable(True) for f in ARROW_SCHEMA])  # let a missing text reach the validator
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(), schema=schema), path)
    return path


def test_every_error_names_its_row_and_field(bad_file):
    good, errors = qio.check_parquet(bad_file)
    assert sorted((e.row, e.field) for e in errors) == sorted((r, f) for r, (f, _) in BAD.items())
    assert [q.id for q in good] == ["q0", "q9"]
    by_row = {e.row: e for e in errors}
    assert "probability outside [0, 1]" in str(by_row[1]) and "1.5" in str(by_row[1])
    assert "as-of date is after the resolution date" in str(by_row[3])
    assert "duplicate id" in str(by_row[4]) and "first at row 0" in str(by_row[4])
    assert str(by_row[5]).startswith("row 5: text: blank")
    assert str(by_row[6]).startswith("row 6: text: missing")


def test_read_parquet_refuses_bad_rows(bad_file):
    with pytest.raises(ValueError, match="8 problems in 8 rows") as e:
        qio.read_parquet(bad_file)
    assert "row 7: outcome" in str(e.value)


def test_validate_command(bad_file, tmp_path, capsys):
    assert cli.main(["data", "validate", str(bad_file)]) == 1
    out = capsys.readouterr().out
    for row, (field, _) in BAD.items():
        assert f"row {row}: {field}:" in out
    assert "8 problems in 8 rows" in out

    clean = tmp_path / "clean.parquet"
    qio.write_parquet([Question(id="a", text="A?", market_prob=0.2), Question(id="b", text="B?", outcome=0)], clean)
    assert cli.main(["data", "validate", str(clean)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("OK") and "2 questions" in out[0] and "1 resolved" in out[0]


def test_validate_unreadable_files(tmp_path, capsys):
    assert cli.main(["data", "validate", str(tmp_path / "nope.parquet")]) == 2
    assert "not found" in capsys.readouterr().err
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"id": ["a"]}), no_text)
    assert cli.main(["data", "validate", str(no_text)]) == 2
    assert "missing columns ['text']" in capsys.readouterr().err
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    assert cli.main(["data", "validate", str(junk)]) == 2
