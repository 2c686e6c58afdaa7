"""The conversation loop (`rollout.multiturn.Rollout`) on a scripted engine and a real tool service over HTTP, in
well under a second: answers shared within a batch are counted apart from the service's cache hits, and with
`rollout.deterministic_turns` the engine sees the same requests in the same order whatever the tools' latency."""

import datetime as dt
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
