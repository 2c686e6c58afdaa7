"""Multi-turn tool-calling rollouts: every conversation of a batch as an exact token buffer, all run together.

**Token-exact.** A conversation is its prompt, then for each turn the ids the model sampled, kept as sampled
(never decoded and re-tokenised: loss mask 1, the sampler's logprobs), then the turn's tool results rendered once
as tokens (loss mask 0, logprob 0). Tool results are rendered by the model's own chat template after a fixed dummy
conversation cut at its last `<|im_end|>`, and the difference is taken: the `\\n` that the template puts after an
assistant's `<|im_end|>` (the model stops at `<|im_end|>` and never samples it) starts the tool tokens instead of
being lost (verl #6501). A template that is not append-only for tool turns is an error, not a silent drift.

**Concurrent.** Each turn is a request of its own on the engine's continuous batch (`engine.TurnEngine`); the
tool calls of every conversation run at once on one event loop (`ToolRunner`, a pooled HTTP client to the tool
service), and a conversation waiting on a tool holds nobody back: the engine keeps decoding the others.

**Bounded.** Every conversation has a wall-clock deadline (`rollout.trajectory_timeout_s`): a straggler ends as
truncated with the reason `deadline`. Turns, calls and tokens have budgets (`rollout.max_turns`, `max_tool_calls`,
`max_trajectory_tokens`). A conversation that fails (an exception of ours) ends as `failed` and is dropped from the
batch and counted; it never fails the step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from rollout import tool_calls
from rollout.config import RolloutConfig
from rollout.engine import Sample, TurnEngine
from rollout.task import Instance

END_OF_TURN = "<|im_end|>"


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
    cache_hits: int = 0
    cache_lookups: int = 0
    final_text: str = ""
    end: str = ""
    """answer | length (a turn hit its token cap) | budget | turns | deadline | eos | failed"""
    failure: str = ""
    request: str | None = None
    pending: concurrent.futures.Future | None = None

    @property
    def done(self) -> bool:
        return bool(self.end)


class ToolSuffix:
    """Tool results as the tokens the chat template puts between two assistant turns."""

    def __init__(self, tokenizer, schemas: list[dict]):
        self.tokenizer, self.schemas = tokenizer, schemas
        self.dummy = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        text = tokenizer.apply_chat_template(self.dummy, tools=schemas, tokenize=False)
        self.prefix = text[:text.rindex(END_OF_TURN) + len(END_OF_TURN)]

    def text(self, contents: list[str]) -> str:
        full = self.tokenizer.apply_chat_template(self.dummy + [{"role": "tool", "content": c} for c in contents],
                                                  tools=self.schemas, tokenize=False, add_generation_prompt=True)
        if not full.startswith(self.prefix):
            raise RuntimeError("the chat template renders earlier turns differently once a tool result follows: "
                               "multi-turn trajectories would not be token-exact")
        return full[len(self.prefix):]

    def ids(self, contents: list[str]) -> list[int]:
        return self.tokenizer(self.text(contents), add_special_tokens=False)["input_ids"]


class ToolRunner:
    """An event loop on its own thread, with one pooled client to the tool service; calls come back as futures."""

    def __init__(self, url: str | None, timeout_s: float):
        self.timeout_s = timeout_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tool-calls", daemon=True)
        self.thread.start()
        self.client = None
        self.set_url(url)

    def set_url(self, url: str | None) -> None:
        """Point at a (restarted) service; the old client's connections are closed."""
        old, self.client = self.client, None
        if url:
            from tools.client import ToolClient

            async def make():
                return ToolClient(url, timeout_s=self.timeout_s)

            self.client = asyncio.run_coroutine_threadsafe(make(), self.loop).result()
        if old is not None:
            asyncio.run_coroutine_threadsafe(old.aclose(), self.loop).result()

    def submit(self, calls: list, as_of, kinds: list[str]) -> concurrent.futures.Future:
        client, timeout = self.client, self.timeout_s + 1.0

        async def one(call):
            if client is None and isinstance(call, tool_calls.Call):
                return tool_calls.Result("error (unavailable): no tool service is running", error="unavailable")
            try:
                return await asyncio.wait_for(tool_calls.run_call(call, client, as_of, kinds), timeout)
            except asyncio.TimeoutError:
                return tool_calls.Result(f"error (unavailable): no answer within {timeout:.0f}s", error="unavailable")

        async def all_calls():
            return await asyncio.gather(*(one(c) for c in calls))

        return asyncio.run_coroutine_threadsafe(all_calls(), self.loop)

    def close(self) -> None:
        self.set_url(None)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class Rollout:
    """Runs a batch of conversations to their ends. One per worker; `run` may be called for every batch."""

    def __init__(self, engine: TurnEngine, tokenizer, runner: ToolRunner, cfg: RolloutConfig, kinds: list[str]):
        self.engine, self.tokenizer, self.runner, self.cfg, self.kinds = engine, tokenizer, runner, cfg, kinds
        self.suffix = ToolSuffix(tokenizer, tool_calls.schemas(kinds))
        self.end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if self.end_of_turn is None or self.end_of_turn == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {END_OF_TURN} token: tool turns need a ChatML chat template")

    def run(self, convs: list[Conversation], temperature: float) -> list[Conversation]:
        self._requests: dict[str, Conversation] = {}
        self._temperature = temperature
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
            elif not followers:
                waiting = [c.pending for c in live if c.pending is not None]
                if waiting:
                    nearest = min(c.deadline for c in live if not c.done) - time.monotonic()
                    concurrent.futures.wait(waiting, timeout=max(0.0, nearest),
                                            return_when=concurrent.futures.FIRST_COMPLETED)
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
                                       top_p=self.cfg.top_p)
        self._requests[c.request] = c

    def _finish_turn(self, c: Conversation, s: Sample) -> None:
        c.ids += s.token_ids
        c.mask += [1] * len(s.token_ids)
        c.logprobs += s.logprobs.tolist()
        c.turns += 1
        c.messages.append({"role": "assistant", "content": s.text})
        calls = tool_calls.parse_calls(s.text, self.kinds)
        if s.truncated:
            c.end = "length"
        elif not calls:
            c.final_text, c.end = s.text, "answer"
        elif c.turns >= self.cfg.max_turns:
            c.end = "turns"
        elif s.token_ids[-1] != self.end_of_turn:
            c.end = "eos"  # stopped on another stop token: the template's tool turn would not follow it
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
            if r.cache_hit is not None:
                c.cache_lookups += 1
                c.cache_hits += r.cache_hit
            contents.append(self._cut(r.content))
        ids = self.suffix.ids(contents)
        if len(c.ids) + len(ids) >= min(self.cfg.max_trajectory_tokens, self.cfg.max_model_len - len(c.prompt)):
            c.end = "budget"
            return
        c.ids += ids
        c.mask += [0] * len(ids)
        c.logprobs += [0.0] * len(ids)
        c.messages += [{"role": "tool", "content": text} for text in contents]
        self._start_turn(c)

    def _cut(self, content: str) -> str:
        ids = self.tokenizer(content, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.cfg.max_tool_response_tokens:
            return content
        return self.tokenizer.decode(ids[:self.cfg.max_tool_response_tokens]) + " [cut]"
