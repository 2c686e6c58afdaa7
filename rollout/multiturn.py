"""Multi-turn tool-calling rollouts: every conversation of a batch as an exact token buffer, all run together.

**Token-exact.** A conversation is its prompt, then for each turn the ids the model sampled, kept as sampled
(never decoded and re-tokenised: loss mask 1, the sampler's logprobs), then the turn's tool results rendered once
as tokens (loss mask 0, logprob 0) by the model's own chat template (`ChatFormat.suffix_ids`): whatever the
template puts after an assistant's end-of-turn token (Qwen's `\\n` after `<|im_end|>`, which the model never
samples) starts the tool tokens instead of being lost (verl #6501). Calls are read by the model family's vLLM tool
parser (`ChatFormat.parse_calls`).

**Concurrent.** Each turn is a request of its own on the engine's continuous batch (`engine.TurnEngine`); the
tool calls of every conversation run at once on one event loop (`ToolRunner`, a pooled HTTP client to the tool
service) that turns between the engine's steps, and a conversation waiting on a tool holds nobody back: the engine
keeps decoding the others. A call asked already in the batch shares the first one's answer. With
`rollout.deterministic_turns` the calls of the turns that ended in one engine step are all answered before the next
step, and the next turns go in in conversation order: the engine's schedule, and so what it samples, no longer
depends on the tools' latency.

**Bounded.** Every conversation has a wall-clock deadline (`rollout.trajectory_timeout_s`): a straggler ends as
truncated with the reason `deadline`. Turns, calls and tokens have budgets (`rollout.max_turns`, `max_tool_calls`,
`max_trajectory_tokens`). A conversation that fails (an exception of ours) ends as `failed` and is dropped from the
batch and counted; it never fails the step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace

from rollout import tool_calls
from rollout.chat_format import ChatFormat
from rollout.config import RolloutConfig
from rollout.engine import Sample, TurnEngine
from rollout.task import Instance

DRAIN_TURNS = 8


@dataclass(eq=False)  # identity: two conversations are never the same one
class Conversation:
    instance: Instance
    prompt: list[int]
    deadline: float
    ids: list[int] = field(default_factory=list)
    """Everything after the prompt: the model's turns and the tool results."""
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    """The assistant and tool messages as they went in (the text of each), for a fresh render to compare with."""
    turns: int = 0
    calls: int = 0
    errors: Counter = field(default_factory=Counter)
    bad_calls: int = 0
    leaks: int = 0
    shared_answers: int = 0
    """Answers shared with an earlier asker of the same call in the batch: no request to the service."""
    cache_hits: int = 0
    cache_lookups: int = 0
    """Of the calls the service answered: those it answered from its revision cache, and all that said either way."""
    final_text: str = ""
    end: str = ""
    """answer | length (a turn hit its token cap) | budget | turns | deadline | eos | failed"""
    failure: str = ""
    request: str | None = None
    pending: asyncio.Task | None = None

    @property
    def done(self) -> bool:
        return bool(self.end)


class ToolRunner:
    """The tool calls of a whole batch on one event loop, with one pooled client to the tool service.

    The loop runs on the caller's thread, between engine steps (`wait`), never on a thread of its own: there it
    contended with the engine's forward pass for the GIL and the core, and every decoding step took twice as long
    (bench/README.md, "Multi-turn cost"). Calls in flight still overlap each other and the engine's steps: the
    service answers in its own process while the engine decodes, and an answer waits at most one step to be read.
    """

    def __init__(self, url: str | None, timeout_s: float):
        self.timeout_s = timeout_s
        self.loop = asyncio.new_event_loop()
        self.client = None
        self.set_url(url)

    def set_url(self, url: str | None) -> None:
        """Point at a (restarted) service; the old client's connections are closed."""
        old, self.client = self.client, None
        self.new_batch()
        if url:
            from tools.client import ToolClient

            async def make():
                return ToolClient(url, timeout_s=self.timeout_s)

            self.client = self.loop.run_until_complete(make())
        if old is not None:
            self.loop.run_until_complete(old.aclose())

    def new_batch(self) -> None:
        """Forget the answers shared so far: they are shared within one batch of conversations only."""
        self._shared = {}

    def submit(self, calls: list, as_of, kinds: list[str]) -> asyncio.Task:
        """The calls' results (a list of `tool_calls.Result`, in order) as a task that runs while `wait` does.

        A call asked already in this batch (same tool, arguments and date: a group's samples mostly ask the same
        page) shares that call's answer instead of asking the service again, unless that answer was one that
        might change on asking again (`tool_calls.SETTLED` says which do not). A shared answer is marked
        `shared` and counted apart from the service's cache hits: it made no request to the service at all.
        """
        client, timeout, shared = self.client, self.timeout_s + 1.0, self._shared

        async def ask(call):
            try:
                return await asyncio.wait_for(tool_calls.run_call(call, client, as_of, kinds), timeout)
            except asyncio.TimeoutError:
                return tool_calls.Result(f"error (unavailable): no answer within {timeout:.0f}s", error="unavailable")

        async def one(call):
            if isinstance(call, tool_calls.BadCall):
                return await tool_calls.run_call(call, client, as_of, kinds)
            if client is None:
                return tool_calls.Result("error (unavailable): no tool service is running", error="unavailable")
            key = (call.name, json.dumps(call.args, sort_keys=True), call.note, as_of)
            first = shared.get(key)
            if first is None or (first.done() and first.result().error not in tool_calls.SETTLED):
                first = shared[key] = self.loop.create_task(ask(call))
                return await asyncio.shield(first)  # a conversation past its deadline leaves it to the others
            return replace(await asyncio.shield(first), shared=True)

        async def all_calls():
            return await asyncio.gather(*(one(c) for c in calls))

        return self.loop.create_task(all_calls())

    def wait(self, tasks: list[asyncio.Task], timeout: float, every: bool = False) -> None:
        """Run the loop until one of `tasks` (all of them, with `every`) is done or `timeout` seconds have passed;
        timeout 0 does only what is ready now (answers already in, requests to send)."""
        async def waiting():
            if tasks and timeout > 0:
                await asyncio.wait(tasks, timeout=timeout,
                                   return_when=asyncio.ALL_COMPLETED if every else asyncio.FIRST_COMPLETED)
            # A call takes a few loop turns to go out and a few to come back (tasks, the pool, the socket): give
            # each a few, so that answers in by now and requests just made all move on, not one stage per step.
            for _ in range(DRAIN_TURNS):
                await asyncio.sleep(0)

        self.loop.run_until_complete(waiting())

    def close(self) -> None:
        self.set_url(None)
        pending = asyncio.all_tasks(self.loop)
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()


class Rollout:
    """Runs a batch of conversations to their ends. One per worker; `run` may be called for every batch."""

    def __init__(self, engine: TurnEngine, fmt: ChatFormat, runner: ToolRunner, cfg: RolloutConfig,
                 call_pattern: str | None = None, answer_pattern: str | None = None, first_call_required: bool = False):
        """Constrained decoding (vLLM structured outputs), each None where free: `answer_pattern` (`task.answer:
        constrained`) makes every turn a call or an answer, and the last turn a conversation may take an answer;
        `first_call_required` (`task.tool_choice: required`) makes every first turn a call."""
        self.engine, self.fmt, self.runner, self.cfg = engine, fmt, runner, cfg
        self.kinds = fmt.kinds
        self.call_pattern, self.answer_pattern = call_pattern, answer_pattern
        self.first_call_required = first_call_required

    def pattern(self, c: Conversation) -> str | None:
        """What the conversation's next turn is constrained to (None: nothing)."""
        if c.turns == 0 and self.first_call_required:
            return self.call_pattern
        if self.answer_pattern is None:
            return None
        if c.turns + 1 >= self.cfg.max_turns or c.calls >= self.cfg.max_tool_calls:  # no call could be answered
            return self.answer_pattern
        return f"({self.call_pattern}|{self.answer_pattern})"

    def run(self, convs: list[Conversation], temperature: float) -> list[Conversation]:
        self._requests: dict[str, Conversation] = {}
        self._temperature = temperature
        self.runner.new_batch()
        # One conversation per question starts first; the rest of its group once the engine has computed (and
        # cached) the shared prompt, instead of computing it G times in the same step.
        leaders = {id(c.instance): c for c in reversed(convs)}
        followers = [c for c in convs if leaders[id(c.instance)] is not c]
        for c in leaders.values():
            self._guard(c, self._start_turn, c)
        while True:
            live = [c for c in convs if not c.done]
            if not live:
                return convs
            now = time.monotonic()
            for c in live:
                if now > c.deadline:
                    self._end(c, "deadline")
                elif c.request is None and c.pending is None and c not in followers:  # stuck: ours, not the model's
                    c.failure = "neither generating nor waiting for a tool"
                    self._end(c, "failed")
            if self.engine.busy():
                for rid, sample in self.engine.step():
                    c = self._requests.pop(rid, None)
                    if c is not None:
                        c.request = None
                        self._guard(c, self._finish_turn, c, sample)
            waiting = [c.pending for c in live if c.pending is not None]
            if waiting:  # calls out: let their answers in; block on them only when the engine has nothing to do
                idle = not self.engine.busy() and not followers
                nearest = max(0.0, min(c.deadline for c in live if not c.done) - time.monotonic())
                if self.cfg.deterministic_turns:  # every answer in before the engine's next step: see the option
                    self.runner.wait(waiting, timeout=nearest, every=True)
                else:
                    self.runner.wait(waiting, timeout=nearest if idle else 0.0)
            for c in followers:  # their prompts are cached by now (or there was nothing to compute)
                self._guard(c, self._start_turn, c)
            followers = []
            for c in convs:
                if c.pending is not None and c.pending.done() and not c.done:
                    self._guard(c, self._tool_results, c)

    def _guard(self, c: Conversation, fn, *args) -> None:
        """One conversation's failure ends that conversation, never the batch."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - isolated on purpose, and counted
            c.failure = f"{type(e).__name__}: {e}"
            self._end(c, "failed")

    def _end(self, c: Conversation, reason: str) -> None:
        if c.request is not None:
            self.engine.abort([c.request])
            self._requests.pop(c.request, None)
            c.request = None
        if c.pending is not None:
            c.pending.cancel()
            c.pending = None
        c.end = reason

    def _start_turn(self, c: Conversation) -> None:
        room = min(self.cfg.max_new_tokens, self.cfg.max_trajectory_tokens - len(c.ids),
                   self.cfg.max_model_len - len(c.prompt) - len(c.ids))
        if room < 1:
            c.end = "budget"
            return
        c.request = self.engine.submit(c.prompt + c.ids, max_tokens=room, temperature=self._temperature,
                                       top_p=self.cfg.top_p, pattern=self.pattern(c))
        self._requests[c.request] = c

    def _finish_turn(self, c: Conversation, s: Sample) -> None:
        c.ids += s.token_ids
        c.mask += [1] * len(s.token_ids)
        c.logprobs += s.logprobs.tolist()
        c.turns += 1
        c.messages.append({"role": "assistant", "content": s.text})
        calls = self.fmt.parse_calls(s.raw)
        if s.truncated:
            c.end = "length"
        elif not calls:
            c.final_text, c.end = s.text, "answer"
        elif c.turns >= self.cfg.max_turns:
            c.end = "turns"
        elif s.token_ids[-1] != self.fmt.turn_end_id:
            c.end = "eos"  # stopped without ending its turn: the template's tool turn would not follow it
        else:
            allowed = max(0, self.cfg.max_tool_calls - c.calls)
            calls = calls[:allowed] + [tool_calls.BadCall("too_many_calls", f"at most {self.cfg.max_tool_calls} "
                                                          "tool calls per question") for _ in calls[allowed:]]
            c.calls += len(calls)
            c.bad_calls += sum(isinstance(x, tool_calls.BadCall) for x in calls)
            c.pending = self.runner.submit(calls, c.instance.question.as_of, self.kinds)

    def _tool_results(self, c: Conversation) -> None:
        results: list[tool_calls.Result] = c.pending.result()
        c.pending = None
        contents = []
        for r in results:
            if r.error:
                c.errors[r.error] += 1
            c.leaks += r.leak_violation
            if r.shared:
                c.shared_answers += 1
            elif r.cache_hit is not None:
                c.cache_lookups += 1
                c.cache_hits += r.cache_hit
            contents.append(self.fmt.cut(r.content, self.cfg.max_tool_response_tokens))
        ids = self.fmt.suffix_ids(contents)
        if len(c.ids) + len(ids) >= min(self.cfg.max_trajectory_tokens, self.cfg.max_model_len - len(c.prompt)):
            c.end = "budget"
            return
        c.ids += ids
        c.mask += [0] * len(ids)
        c.logprobs += [0.0] * len(ids)
        c.messages += [{"role": "tool", "content": text} for text in contents]
        self._start_turn(c)

