import datetime as dt

import pytest

from cluster import cli
from cluster.config import ConfigError, load_config
from rollout import questions as qio
from rollout.config import TaskConfig
from rollout.questions import Question
from rollout.splits import held_out, normalise_text, time_split
from rollout.task import load_pool

CUT = dt.date(2024, 6, 1)


def q(id, text, as_of, **kw):
    return Question(id=id, text=text, as_of=as_of, **kw)


def test_normalise_text():
    assert normalise_text("  Will X win the 2024 Election?\n") == "will x win the 2024 election"
    assert normalise_text("Will X  win -- the 2024 election") == normalise_text("will x win the 2024 election!")
    assert normalise_text("Will X win?") != normalise_text("Will Y win?")


def test_time_split_sides_and_leaks():
    qs = [
        q("a", "Will A happen?", dt.date(2024, 1, 1)),
        q("b", "Will B happen?", dt.date(2024, 5, 31)),
        q("c", "Will C happen?", CUT),                         # on the cutoff: eval
        q("d", "Will D happen?", dt.date(2024, 9, 1)),
        q("a", "Will A happen, asked again?", dt.date(2024, 7, 1)),   # same id as a training question
        q("b2", "will  B happen", dt.date(2024, 8, 1)),          # same text, other id and punctuation
        q("e", "Will E happen?", None),                          # cannot be placed
    ]
    s = time_split(qs, CUT)
    assert [x.id for x in s.train] == ["a", "b"]
    assert [x.id for x in s.eval] == ["c", "d"]
    assert s.removed == {"eval: dropped, same id as a training question": 1,
                         "eval: dropped, same text as a training question": 1,
                         "no as-of date: in neither split": 1}
    assert {x.id for x in s.train}.isdisjoint(x.id for x in s.eval)
    assert {normalise_text(x.text) for x in s.train}.isdisjoint(normalise_text(x.text) for x in s.eval)
    assert all(x.as_of < CUT for x in s.train) and all(x.as_of >= CUT for x in s.eval)


def test_outcomes_resolved_after_the_cutoff_are_hidden():
    qs = [q("early", "Early?", dt.date(2024, 1, 1), resolution_date=dt.date(2024, 3, 1), outcome=1),
          q("late", "Late?", dt.date(2024, 1, 1), resolution_date=CUT, outcome=0, market_prob=0.3),
          q("open", "Open?", dt.date(2024, 1, 1), market_prob=0.6)]
    s = time_split(qs, CUT)
    by_id = {x.id: x for x in s.train}
    assert by_id["early"].outcome == 1
    assert by_id["late"].outcome is None and by_id["late"].market_prob == 0.3
    assert s.removed == {"train: outcome hidden, resolved on or after the cutoff": 1}
    kept = time_split(qs, CUT, hide_late_outcomes=False)
    assert {x.id: x.outcome for x in kept.train}["late"] == 0
    assert not kept.removed
    assert qs[1].outcome == 0  # the input is not changed


def test_split_command(tmp_path, capsys):
    src = tmp_path / "all.parquet"
    qio.write_parquet([q("a", "A?", dt.date(2024, 1, 1)), q("b", "B?", dt.date(2024, 7, 1)),
                       q("a2", "a", dt.date(2024, 8, 1))], src)
    tr, ev = tmp_path / "train.parquet", tmp_path / "eval.parquet"
    rc = cli.main(["data", "split", str(src), "--cutoff", "2024-06-01", "--train", str(tr), "--eval", str(ev)])
    assert rc == 0
    assert [x.id for x in qio.read_parquet(tr)] == ["a"]
    assert [x.id for x in qio.read_parquet(ev)] == ["b"]
    out = capsys.readouterr().out
    assert "train 1 questions, eval 1" in out and "same text as a training question" in out
    assert cli.main(["data", "split", str(src), "--cutoff", "June", "--train", str(tr), "--eval", str(ev)]) == 2
    assert "not an ISO date" in capsys.readouterr().err


def test_held_out_files_share_no_question_with_training():
    train = [q("a", "Will A happen?", dt.date(2024, 1, 1)), q("b", "Will B happen?", dt.date(2024, 2, 1))]
    later = [q("a", "Will A happen, asked again?", dt.date(2024, 7, 1)), q("b2", "will B happen", dt.date(2024, 8, 1)),
             q("c", "Will C happen?", dt.date(2024, 9, 1)), q("c", "Will C, listed twice?", dt.date(2024, 9, 2))]
    s = held_out(train, later)
    assert [x.id for x in s.eval] == ["c"] and s.eval[0].text == "Will C happen?" and s.train == train
    assert s.removed == {"eval: dropped, same id as a training question": 1,
                         "eval: dropped, same text as a training question": 1,
                         "eval: dropped, an id already in the held-out set": 1}


def test_task_pools_hold_out_without_overlap_and_need_dates_with_tools(tmp_path):
    data, held = tmp_path / "train.parquet", tmp_path / "eval.parquet"
    qio.write_parquet([q("a", "A?", dt.date(2024, 1, 1), market_prob=0.2), q("b", "B?", dt.date(2024, 2, 1)),
                       q("late", "Late?", dt.date(2024, 8, 1), market_prob=0.5)], data)
    qio.write_parquet([q("a", "A again?", dt.date(2024, 7, 1), market_prob=0.3),
                       q("c", "C?", dt.date(2024, 7, 1), market_prob=0.4), q("d", "D?", None, market_prob=0.6)], held)
    task = TaskConfig(source="parquet", data=str(data), eval_data=str(held))  # one file, or a list of them
    assert task.eval_data == [str(held)]
    assert [x.id for x in load_pool(task)] == ["a", "late"]  # b has no market to score against
    assert [x.id for x in load_pool(task, "heldout")] == ["c", "d"]
    cut = TaskConfig(source="parquet", data=str(data), train_before="2024-06-01")  # the later side of task.data
    assert [x.id for x in load_pool(cut)] == ["a"] and [x.id for x in load_pool(cut, "heldout")] == ["late"]
    assert [x.id for x in load_pool(cut.model_copy(update={"eval_data": [str(held)]}), "heldout")] == ["c", "d"]
    with pytest.raises(ValueError, match=r"1 of the held-out questions \(.*eval.parquet\) have no as-of date.*d"):
        load_pool(task.model_copy(update={"tools": ["wiki"]}), "heldout")
    assert [x.id for x in load_pool(task.model_copy(update={"tools": ["wiki"]}))] == ["a", "late"]
    with pytest.raises(ConfigError, match="task.eval_data and task.train_before split real questions"):
        load_config(None, [f"task.eval_data={held}"])
