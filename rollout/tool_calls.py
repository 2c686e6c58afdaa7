"""The tools as the model sees them: schemas for the chat template, validating its calls, running them, and what
goes back into the conversation.

A call is written in the model's own format and read by vLLM's tool parser for it (`rollout/chat_format.py`); what
the parser read is validated here (`validate`). The
schemas are generated from the pydantic models below and have **no date argument**: every call runs as of the
question's date. A model that passes a date anyway gets the as-of answer and a note saying so.

A bad call (invalid JSON, an unknown tool, wrong or huge arguments, a title with control characters, one call too
many) is answered with an error message in place of a result, and counted by kind; nothing raises. Every result
carries the timestamps of what it shows, and `run_call` checks them against the as-of date itself (the leak audit):
content from after that date is never shown, whatever the service said. Nor is what only the future knows: a page
created after the date reads exactly as one that never existed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tools.asof import check_timestamp, is_after
from tools.errors import ToolError
from tools.wiki import check_title

MAX_ARGUMENT_CHARS = 512
DATE_ARGUMENTS = ("as_of", "asof", "date", "as_of_date", "when", "time", "timestamp", "day", "year")
"""Arguments a model may invent to pick the date; they are dropped (with a note), the question's date is used."""
SETTLED = (None, "bad_request", "invalid_title", "missing", "not_yet", "offline_miss")
"""Answers that asking again the same day cannot change: what a page or a search showed as of a date is fixed.
(Not: leak, upstream, internal, unavailable.)"""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class WikiArgs(_Args):
    """A Wikipedia page as it stood on the question's date."""

    title: str = Field(description="page title")


class WikiSearchArgs(_Args):
    """Search the Wikipedia pages that existed on the question's date."""

    query: str = Field(description="search words")


class NewsArgs(_Args):
    """Search news summaries published up to the question's date."""

    query: str = Field(description="search words")


# tool kind (task.tools) -> the functions it gives the model: name -> (arguments, service endpoint)
KINDS: dict[str, dict[str, tuple[type[_Args], str]]] = {
    "wiki": {"wiki": (WikiArgs, "revision")},
    "wiki_search": {"wiki_search": (WikiSearchArgs, "search")},
    "news": {"news": (NewsArgs, "news")},
}


def functions(kinds: list[str]) -> dict[str, tuple[type[_Args], str]]:
    return {name: spec for kind in kinds for name, spec in KINDS[kind].items()}


def schemas(kinds: list[str]) -> list[dict]:
    """OpenAI-style function schemas, as chat templates take them in `tools=`."""
    out = []
    for name, (model, _) in functions(kinds).items():
        params = model.model_json_schema()
        for key in ("title", "description", "additionalProperties"):  # the function's own; and short prompts
            params.pop(key, None)
        for p in params["properties"].values():
            p.pop("title", None)
        out.append({"type": "function",
                    "function": {"name": name, "description": model.__doc__.strip(), "parameters": params}})
    return out


REQUIRED_ARGUMENT_CHARS = 60
"""Per argument, in a call forced by `task.tool_choice: required` (60 characters fit any title's 255 bytes)."""


def hermes_call_pattern(kinds: list[str]) -> str:
    """A regular expression for one call of any of the functions in the Hermes format (Qwen2.5, Qwen3, and
    `model.tool_prompt: hermes_system`): what `task.tool_choice: required` constrains a first turn to. Its strings
    are JSON strings without escapes or control characters, so whatever it lets through is a valid call."""
    char = r'[^"\\\x00-\x1f\x7f]'
    string = rf'"{char[:-1]} ]{char}{{0,{REQUIRED_ARGUMENT_CHARS - 1}}}"'  # not blank: arguments are stripped
    alternatives = []
    for name, (model, _) in functions(kinds).items():
        if any(f.annotation is not str for f in model.model_fields.values()):
            raise TypeError(f"{name}: hermes_call_pattern knows string arguments only")
        args = ", ".join(f'"{field}": {string}' for field in model.model_fields)
        alternatives.append(rf'\{{"name": "{name}", "arguments": \{{{args}\}}\}}')
    return r"<tool_call>\n(" + "|".join(alternatives) + r")\n</tool_call>"


@dataclass
class Call:
    name: str
    args: dict
    note: str = ""


@dataclass
class BadCall:
    kind: str
    """invalid_json, unknown_tool, bad_arguments, too_long, bad_title, too_many_calls"""
    message: str


def validate(name: str, arguments: str | dict, fns: dict) -> Call | BadCall:
    """A call as the tool parser read it (the arguments as JSON text, or parsed), checked against the functions."""
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    if len(raw) > MAX_ARGUMENT_CHARS:
        return BadCall("too_long", f"tool call arguments of {len(raw)} characters (at most {MAX_ARGUMENT_CHARS})")
    try:
        args = json.loads(raw)
    except ValueError as e:
        return BadCall("invalid_json", f"the tool call's arguments are not valid JSON ({e.msg} at character {e.pos})")
    if name not in fns:
        return BadCall("unknown_tool", f"no tool named {name!r}; tools: {', '.join(fns)}")
    if not isinstance(args, dict):
        return BadCall("bad_arguments", f"{name}: arguments must be an object")
    dropped = [k for k in args if k.lower() in DATE_ARGUMENTS]
    args = {k: v for k, v in args.items() if k not in dropped}
    try:
        parsed = fns[name][0].model_validate(args)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors())
        return BadCall("bad_arguments", f"{name}: {problems}")
    values = parsed.model_dump()
    if not all(values.values()):
        return BadCall("bad_arguments", f"{name}: {', '.join(k for k, v in values.items() if not v)} is empty")
    if "title" in values:
        try:  # the wiki's own rule, refused here already: a bad title costs no request
            check_title(values["title"])
        except ToolError as e:
            return BadCall("bad_title", f"{name}: {e.message}")
    note = f"(the date argument {', '.join(dropped)} was ignored: results are as of the question's date)" \
        if dropped else ""
    return Call(name, values, note)


@dataclass
class Result:
    """What one call gives back: the text the model reads and what the audit and the metrics need."""

    content: str
    error: str | None = None
    """None, a BadCall kind, or a ToolError code (missing, not_yet, unavailable, leak, ...)."""
    shown: list[str] = field(default_factory=list)
    """Timestamps (or dates) of everything the content shows."""
    cache_hit: bool | None = None
    """Whether the service answered from its revision cache (None: the answer does not say)."""
    shared: bool = False
    """The answer of the same call asked earlier in the batch (`multiturn.ToolRunner`): no request to the service."""
    leak_violation: bool = False


def render(name: str, body: dict, as_of: dt.date) -> tuple[str, list[str]]:
    """A service answer as the text the model reads, and the timestamps of what that text shows."""
    if name == "wiki":
        head = f"{body['title']} (revision of {body['timestamp'][:10]})"
        return f"{head}\n{body['text']}", [body["timestamp"]]
    if name == "wiki_search":
        hits = body["results"]
        lines = [f"- {h['title']}: {h['snippet']}" for h in hits] or ["no pages found"]
        return "\n".join(lines), [h["timestamp"] for h in hits]
    items = body["results"]
    lines = [f"{it['date']} {it['title']}: {it['summary']} ({it['source']})" for it in items] or ["no news found"]
    return "\n".join(lines), [f"{it['date']}T00:00:00Z" for it in items]


def _later_or_unreadable(timestamp, as_of: dt.date) -> bool:
    """A timestamp that does not parse cannot be shown to be on or before the date, so it counts as later."""
    try:
        return is_after(check_timestamp(timestamp), as_of)
    except ValueError:
        return True


async def run_call(call: Call | BadCall, client, as_of: dt.date, kinds: list[str]) -> Result:
    """Run one call against the tool service (`tools.client.ToolClient`); never raises."""
    if isinstance(call, BadCall):
        return Result(f"error ({call.kind}): {call.message}", error=call.kind)
    endpoint = functions(kinds)[call.name][1]
    arg = call.args.get("title", call.args.get("query"))
    try:
        body = await getattr(client, endpoint)(arg, as_of)
    except ToolError as e:
        if e.code in ("missing", "not_yet"):  # the same words for both: that a page will exist is itself a leak
            return Result(f"error (missing): there is no page {arg!r} as of {as_of}", error=e.code)
        return Result(f"error ({e.code}): {e.message}", error=e.code)
    except (asyncio.TimeoutError, OSError) as e:
        return Result(f"error (unavailable): the tool service did not answer ({type(e).__name__})", error="unavailable")
    try:
        content, shown = render(call.name, body, as_of)
    except (KeyError, TypeError) as e:
        return Result(f"error (unavailable): the tool service sent a malformed answer ({e!r})", error="unavailable")
    if any(_later_or_unreadable(t, as_of) for t in shown):  # the audit: never trust the service with the future
        return Result("error (leak): the answer held content from after the question's date and was withheld",
                      error="leak", leak_violation=True)
    if call.note:
        content = f"{content}\n{call.note}"
    return Result(content, shown=shown, cache_hit=body.get("cache") == "hit" if "cache" in body else None)
