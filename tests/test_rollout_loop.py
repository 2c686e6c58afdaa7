"""The conversation loop (`rollout.multiturn.Rollout`) on a scripted engine and a real tool service over HTTP, in
well under a second: answers shared within a batch are counted apart from the service's cache hits, and with
`rollout.deterministic_turns` the engine sees the same requests in the same order whatever the tools' latency."""

import datetime as dt
import re
import time

import numpy as np
import pytest
from fastapi import FastAPI

from rollout import tool_calls
from rollout.config import RolloutConfig, TaskConfig
from rollout.engine import Sample
from rollout.multiturn import Conversation, Rollout, ToolRunner
from rollout.questions import Question
from rollout.task import Instance
from rollout.trajectory import TrajectoryBuilder, rollout_stats
from tools.service import run_app_in_thread

END, TOOL = 2, 3  # end of turn; first token of a tool turn


class ScriptedEngine:
    """A `TurnEngine` stand-in. A turn takes 1-3 decoding steps (by its player); the first calls `wiki` for the
    player (its prompt's first token), a later one answers. Each finished turn's first token is the engine's next
    draw, like vLLM's sampler drawing from one generator for the whole batch: what a turn gets depends on the order
    the engine sees the turns in, as with the real one. `log` is every request as submitted: (engine step, prompt)."""

    def __init__(self):
        self.steps, self.draws, self.running, self.log = 0, 0, {}, []

    def submit(self, prompt, *, max_tokens, temperature, top_p, pattern=None) -> str:
        rid = f"turn-{len(self.log)}"
        self.log.append((self.steps, tuple(prompt)))
        self.running[rid] = [prompt, 1 + prompt[0] % 3]
        return rid

    def busy(self) -> bool:
        return bool(self.running)

    def step(self) -> list:
        self.steps += 1
        done = []
        for rid, turn in list(self.running.items()):
            turn[1] -= 1
            if turn[1] == 0:
                del self.running[rid]
                prompt, self.draws = turn[0], self.draws + 1
                raw = "<answer>0.5</answer>" if TOOL in prompt else f"CALL:Player {prompt[0]}"
                done.append((rid, Sample([100 + self.draws, END], np.zeros(2, np.float32), raw, False, raw)))
        return done

    def abort(self, rids) -> None:
        for rid in rids:
            self.running.pop(rid, None)


class Format:
    """A `ChatFormat` stand-in: `CALL:<title>` is a wiki call; a tool turn is TOOL and each result's length."""

    kinds = ["wiki"]
    turn_end_id = END

    def parse_calls(self, raw: str) -> list:
        return [tool_calls.Call("wiki", {"title": raw.removeprefix("CALL:")})] if raw.startswith("CALL:") else []

    def cut(self, content: str, max_tokens: int) -> str:
        return content

    def suffix_ids(self, contents: list[str]) -> list[int]:
        return [TOOL, *map(len, contents)]


@pytest.fixture(scope="module")
def service():
    """A revision service whose cache misses a title the first time it is asked and hits after; `delay` holds
    each title's answer back that many seconds."""
    app, asked, delay = FastAPI(), [], {}

    @app.get("/revision")
    def revision(title: str, as_of: str):
        time.sleep(delay.get(title, 0.0))
        hit = title in asked
        asked.append(title)
        return {"title": title, "revid": 1, "timestamp": "2024-01-01T00:00:00Z", "text": f"the page of {title}",
                "cache": "hit" if hit else "miss"}

    running = run_app_in_thread(app)
    yield running.url, asked, delay
    running.stop()


def _run(url, players, group, **rollout):
    cfg = RolloutConfig(max_turns=3, max_tool_calls=2, max_trajectory_tokens=64, **rollout)
    engine, runner = ScriptedEngine(), ToolRunner(url, timeout_s=10)
    deadline = time.monotonic() + 30
    convs = [Conversation(Instance(Question(id=f"q{p}", text="?", as_of=dt.date(2024, 6, 1)), 0.5, p), [p, 1],
                          deadline) for p in players for _ in range(group)]
    try:
        Rollout(engine, Format(), runner, cfg).run(convs, temperature=1.0)
    finally:
        runner.close()
    assert all(c.end == "answer" and c.turns == 2 and c.calls == 1 for c in convs), [c.end for c in convs]
    return convs, engine.log


def test_answers_shared_within_a_batch_are_no_cache_hits(service):
    url, asked, _ = service
    asked.clear()
    convs, _ = _run(url, players=[10, 11], group=4)
    # two distinct calls reached the service, both misses; the six repeats were shared, asking it nothing
    assert sorted(asked) == ["Player 10", "Player 11"]
    assert sum(c.cache_lookups for c in convs) == 2 and sum(c.cache_hits for c in convs) == 0
    assert sum(c.shared_answers for c in convs) == 6
    convs, _ = _run(url, players=[10, 11], group=4)  # the next batch: the service's cache now has both
    assert sum(c.cache_hits for c in convs) == sum(c.cache_lookups for c in convs) == 2
    assert sum(c.shared_answers for c in convs) == 6

    # what the step reports (metrics.jsonl, the step line, the Ray metrics): the two apart
    b = TrajectoryBuilder()
    for c in convs:
        b.add(c.prompt, c.ids, c.mask, c.logprobs, rewards=-0.7, group_ids=c.instance.group_id, policy_version=0,
              forecasts=0.5, targets=0.5, p_true=0.5, truncated=False, question_ids=c.instance.question.id,
              turns=c.turns, tool_calls=c.calls)
    stats = {"tool_shared_answers": sum(c.shared_answers for c in convs),  # as the rollout worker sums them
             "cache_hits": sum(c.cache_hits for c in convs), "cache_lookups": sum(c.cache_lookups for c in convs)}
    m = rollout_stats(b.build(tool_stats=stats), TaskConfig())
    assert m["tool_calls"] == 8 and m["tool_shared_answers"] == 6 and m["cache_hit_rate"] == 1.0


def test_deterministic_turns_give_the_engine_one_order_whatever_the_latency(service):
    url, _, delay = service
    runs = {}
    for deterministic in (False, True):
        for slow in ("Player 20", "Player 21"):  # one player's answer late, then the other's
            delay.clear()
            delay[slow] = 0.3
            convs, log = _run(url, players=[20, 21], group=2, deterministic_turns=deterministic)
            runs[deterministic, slow] = log, [c.ids for c in convs]
    delay.clear()
    # today's order: a turn goes in when its answer is read, so the late player's turns go in last and draw other
    # numbers; deterministic: the same requests at the same engine steps, and the same conversations
    assert runs[False, "Player 20"] != runs[False, "Player 21"]
    assert runs[True, "Player 20"] == runs[True, "Player 21"]


class ScriptedModel:
    """A `TurnEngine` stand-in in the tiny model's own tokens, for a real `RolloutWorker`: a forecaster that reasons,
    searches the wiki for the player in its question, reads the news about them, then reasons to an answer. Each turn
    is what follows the last tool result in the conversation so far (counted by its tool turns)."""

    def __init__(self, llm, tokenizer, end_ids):
        from rollout.chat_format import ChatFormat

        self.tok, self.end = tokenizer, end_ids[0]
        self.fmt = ChatFormat(tokenizer, ["wiki", "wiki_search", "news"])
        self.running: dict[str, list[int]] = {}
        self.submitted = 0

    def submit(self, prompt, *, max_tokens, temperature, top_p, pattern=None) -> str:
        rid, self.submitted = f"turn-{self.submitted}", self.submitted + 1
        self.running[rid] = prompt
        return rid

    def busy(self) -> bool:
        return bool(self.running)

    def turn(self, prompt: list[int]) -> str:
        text = self.tok.decode(prompt)
        player = re.search(r"Player \d+", text).group(0)
        script = [f"I should find the page of {player} first.\n" + self.fmt.call_text("wiki_search", {"query": player}),
                  "And whether anything changed lately.\n" + self.fmt.call_text("news", {"query": player}),
                  "The page gives the winning faces; allowing for a change, about three in ten.\n<answer>0.3</answer>"]
        return script[text.count("<tool_response>")]

    def step(self) -> list:
        done = []
        for rid, prompt in self.running.items():
            raw = self.turn(prompt)
            ids = self.tok(raw, add_special_tokens=False).input_ids + [self.end]
            done.append((rid, Sample(ids, np.full(len(ids), -0.1, np.float32), raw, False, raw)))
        self.running = {}
        return done

    def abort(self, rids) -> None:
        for rid in rids:
            self.running.pop(rid, None)


def test_a_worker_reasoning_with_search_and_news(monkeypatch, tmp_path, tiny_model, tool_world_files):
    """What the GPU configs run (task.reasoning with tools), with `wiki_search` and `news`, through a real
    `RolloutWorker` (its chat format, prompts, tool runner, scoring), the real tool service on the tool world, and a
    scripted model in place of vLLM: every call is answered with what stood on the question's date, and the answer
    after the reasoning is the forecast, in training and in evaluation."""
    from rollout import engine, prompts, synthetic, tool_world
    from rollout.worker import RolloutWorker
    from tests.conftest import make_cfg
    from tools.service import serve_in_thread

    cfg = make_cfg(tiny_model, "task.families=[tool_world]", "task.tools=[wiki,wiki_search,news]",
                   "task.reasoning=true", "rollout.group_size=2", "rollout.max_turns=3", "rollout.max_tool_calls=2",
                   "rollout.max_new_tokens=128", "rollout.max_trajectory_tokens=1024", "rollout.max_model_len=2048",
                   f"tools.wiki.snapshot={tool_world_files / 'wiki.parquet'}", "tools.wiki.offline=true",
                   f"tools.wiki.cache={tmp_path / 'cache.sqlite'}", f"tools.wiki.tokenizer={tiny_model}",
                   f"tools.news.corpus={tool_world_files / 'news.parquet'}")
    players = {p.name: p for split in tool_world.players().values() for p in split}
    # questions asked within the news window of the rule then in force: the news has something to say
    asked = [q for q in synthetic.questions(["tool_world"], "train")
             if (q.as_of - players[re.search(r"Player \d+", q.text).group(0)].rule_on(q.as_of).since).days < 20][:3]
    assert len(asked) == 3
    monkeypatch.setattr(engine, "configure_env", lambda *a, **k: None)  # no engine: no vLLM settings for this process
    monkeypatch.setattr(engine, "make_engine", lambda *a, **k: None)
    monkeypatch.setattr(engine, "TurnEngine", ScriptedModel)
    service = serve_in_thread(cfg.tools)
    worker = RolloutWorker(cfg.rollout_job(), tool_url=service.url)
    try:
        b = worker.generate([Instance(q, q.p_true, g) for g, q in enumerate(asked)])
        evaluated = worker.forecasts(asked, 2)
    finally:
        worker._rollout.runner.close()
        service.stop()
    assert b.num_sequences == 6 and set(b.end_reason) == {"answer"}
    assert (b.turns == 3).all() and (b.tool_calls == 2).all() and b.tool_errors.sum() == 0
    assert b.leak_violations.sum() == 0
    assert np.all(b.forecasts == np.float32(0.3))  # the last answer tag after the reasoning (strict: none)
    assert np.array_equal(evaluated.forecasts, np.full((3, 2), 0.3))
    tok = worker.tokenizer
    for i in range(b.num_sequences):
        q = asked[b.group_ids[i]]
        player = players[re.search(r"Player \d+", q.text).group(0)]
        rule = player.rule_on(q.as_of)
        seq, plen = b.tokens[b.sequence(i)], b.prompt_lens[i]
        prompt = tok.decode(seq[:plen])
        assert prompts.REASONING_INSTRUCTION in prompt and prompts.TOOLS_INSTRUCTION in prompt
        tools = prompt.split("<tools>")[1].split("</tools>")[0]  # the tiny template's layout: name(arguments): ...
        assert [line.split("(")[0] for line in tools.strip().splitlines()] == ["wiki", "wiki_search", "news"]
        shown = tok.decode([t for t, m in zip(seq[plen:], b.loss_mask[b.sequence(i)][plen:]) if not m])
        # the search found the page as it stood on the date, and the news the item of the rule then in force
        assert f"- {player.name}: " in shown and f"{rule.wins} of which win" in shown, shown
        assert f"{rule.since.isoformat()} {player.name}" in shown, shown
        later = [r for r in player.rules if r.since > q.as_of]
        assert not any(f"{r.since.isoformat()} {player.name}" in shown for r in later)
