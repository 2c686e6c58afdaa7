"""The format warm start (model/warmstart.py) on the real SmolLM2-135M-Instruct, which never answers in format.

A few steps on dice take it from 0% of sampled answers in format to most (6 steps of 4 at lr 1e-4: 0/8 -> 8/8 here, for
each of 4 seeds); a second run is a no-op; the targets carry no information; and with tools, on the tool world, an
example calls `wiki` for the question's player in the model's own call format, reads the real page from the tool
service, and is trained on its own turns only.
"""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from conftest import make_cfg

from model import warmstart
from model.cli import warmstart_main
from rollout import prompts, tool_world
from rollout.chat_format import ChatFormat
from rollout.task import load_pool
from rollout.tool_calls import Call


@pytest.fixture(scope="module")
def dice_cfg(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("warmstart") / "smollm2-format"
    return make_cfg(out, f"warmstart.base={smollm2}", "task.families=[dice]", "warmstart.steps=6",
                    "warmstart.batch_size=4", "warmstart.lr=1e-4", "warmstart.measure=8")


def test_warm_start_teaches_the_format_and_runs_once(dice_cfg, smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = warmstart.ensure(dice_cfg)
    info = json.loads((out / "warmstart.json").read_text())
    assert info["base"] == str(smollm2) and info["warmstart"] == dice_cfg.warmstart.model_dump()
    assert info["task"]["families"] == ["dice"] and info["steps"] == 6 and info["measured"] == 8
    assert info["format_rate_before"] == 0.0, info  # SmolLM2 never writes <answer>p</answer> on its own
    assert info["format_rate_after"] >= 0.5, info["samples_after"]
    assert info["loss_last"] < info["loss_first"]
    # a normal folder: the weights, the same template, and generation stops where a turn ends
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(smollm2).chat_template
    assert GenerationConfig.from_pretrained(out).eos_token_id == 2

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    said = []
    assert warmstart.ensure(dice_cfg, log=said.append) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert "nothing to do" in said[0]


def test_opinions_answer_the_question_and_know_nothing_of_the_truth(smollm2):
    """warmstart.forecasts: opinion: each question gets its own belief (answers within the spread of it, the same
    belief whenever it is asked), a hash of its text: across questions unrelated to p*."""
    cfg = make_cfg(smollm2, "task.families=[dice_sizes]", "warmstart.forecasts=opinion")
    fmt = ChatFormat.for_model(cfg.model, [])
    examples, _ = warmstart.make_examples(cfg, fmt, load_pool(cfg.task), 3000, random.Random(0))
    by_q: dict[str, list[float]] = {}
    for e in examples:
        by_q.setdefault(e.question.id, []).append(e.forecast)
    spread = cfg.warmstart.opinion_spread
    assert all(max(f) - min(f) <= 2 * spread + 0.011 for f in by_q.values())
    centres = {q: np.mean(f) for q, f in by_q.items() if len(f) >= 10}
    assert np.std(list(centres.values())) > 0.15  # the opinions differ from question to question
    truth = {e.question.id: e.question.p_true for e in examples}
    assert abs(np.corrcoef(list(centres.values()), [truth[q] for q in centres])[0, 1]) < 0.3  # ~100 questions


def test_base_rate_answers_every_question_alike(smollm2):
    """warmstart.forecasts: base_rate: every answer within the spread of the training questions' mean target, the
    same centre for every question, so nothing about any one question's truth."""
    cfg = make_cfg(smollm2, "task.families=[dice_sizes]", "warmstart.forecasts=base_rate",
                   "warmstart.opinion_spread=0.05")
    pool = load_pool(cfg.task)
    examples, _ = warmstart.make_examples(cfg, ChatFormat.for_model(cfg.model, []), pool, 2000, random.Random(0))
    base = np.mean([q.p_true for q in pool])
    forecasts = np.array([e.forecast for e in examples])
    assert np.all(np.abs(forecasts - base) <= 0.05 + 0.006) and abs(forecasts.mean() - base) < 0.01
    truth = np.array([e.question.p_true for e in examples])
    assert abs(np.corrcoef(forecasts, truth)[0, 1]) < 0.1


def test_targets_carry_no_information(smollm2):
    cfg = make_cfg(smollm2, "task.families=[dice]")
    fmt = ChatFormat.for_model(cfg.model, [])
    examples, errors = warmstart.make_examples(cfg, fmt, load_pool(cfg.task), 4000, random.Random(0))
    forecasts = np.array([e.forecast for e in examples])
    truth = np.array([e.question.p_true for e in examples])
    assert abs(np.corrcoef(forecasts, truth)[0, 1]) < 0.1
    assert forecasts.min() == 0.01 and forecasts.max() == 0.99 and len({e.question.id for e in examples}) == 10
    assert not errors and all(e.call is None for e in examples)
    for e in examples[:50]:  # the prompt as the rollout renders it, then the answer turn, the only one trained on
        user = prompts.user_message(e.question, False, False)
        answer = fmt.ids(f"<answer>{e.forecast:.2f}</answer>") + [fmt.end_ids[0]]
        assert e.segments == [(fmt.prompt_ids(user, None, False), False), (answer, True)]


def test_tool_examples_call_the_players_page(smollm2, tool_world_files, tmp_path):
    cfg = make_cfg(smollm2, "task.families=[tool_world]", "task.tools=[wiki]", "model.tool_prompt=hermes_system",
                   f"tools.wiki.snapshot={tool_world_files / 'wiki.parquet'}", "tools.wiki.offline=true",
                   f"tools.wiki.tokenizer={smollm2}", f"tools.wiki.cache={tmp_path / 'wiki.sqlite'}")
    fmt = ChatFormat.for_model(cfg.model, cfg.task.tools)
    examples, errors = warmstart.make_examples(cfg, fmt, load_pool(cfg.task), 8, random.Random(0))
    calling = [e for e in examples if e.call is not None]
    assert 0 < len(calling) < len(examples) and not errors
    players = {p.name: p for p in tool_world.players()["train"]}
    end = fmt.tokenizer.decode([fmt.turn_end_id])
    for e in examples:
        q = e.question
        assert e.segments[0] == (fmt.prompt_ids(prompts.user_message(q, False, True), q.as_of, True), False)
        answer = f"<answer>{e.forecast:.2f}</answer>"
        assert e.segments[-1] == (fmt.ids(answer) + [fmt.turn_end_id], True)
        if e.call is None:
            assert len(e.segments) == 2
            continue
        player = re.search(r"Player \d+", q.text).group(0)
        call_text = fmt.call_text("wiki", {"title": player})
        assert e.call == Call("wiki", {"title": player})
        assert e.segments[1] == (fmt.ids(call_text) + [fmt.turn_end_id], True)
        assert fmt.tokenizer.decode(e.segments[1][0]) == call_text + end
        # the tool turn: the page as the service showed it on the question's date, as the rollout renders it
        assert e.result.error is None and e.result.content.startswith(f"{player} (revision of ")
        assert players[player].rule_on(q.as_of).sentence() in e.result.content
        assert e.segments[2] == (fmt.suffix_ids([fmt.cut(e.result.content, cfg.rollout.max_tool_response_tokens)]),
                                 False)
        assert len(e.segments) == 4
    # the loss mask of a batch is 1 on exactly the model's own turns (and 0 on the padding)
    ids, attention, own = warmstart.collate(examples, fmt.end_ids[0])
    for row, e in enumerate(examples):
        mine = [int(m) for seg, m in e.segments for _ in seg]
        n = len(mine)
        assert own[row, :n].tolist() == mine and not own[row, n:].any() and attention[row].sum() == n
        trained = fmt.tokenizer.decode(ids[row][own[row].bool()].tolist())
        called = fmt.call_text(e.call.name, e.call.args) + end if e.call else ""
        assert trained == called + f"<answer>{e.forecast:.2f}</answer>" + end


def test_cli_errors_name_the_problem(smollm2, tmp_path, capsys):
    out = f"model.path={tmp_path / 'out'}"
    cases = [([out], "warmstart.base is not set"),
             ([out, f"warmstart.base={tmp_path / 'nope'}"], "no such folder"),
             ([out, f"warmstart.base={smollm2}", "task.tools=[wiki]"], "ignores tools=")]
    for args, message in cases:
        assert warmstart_main([a for arg in args for a in ("--set", arg)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
