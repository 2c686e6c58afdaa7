"""How one model talks, read from its tokenizer, its generation config and its chat template, never from literals:
where its turns end, how its prompts render (as of the question's date), how it writes a tool call (vLLM's tool
parser for its family), and how a tool result goes back into a conversation as tokens.

**End of turn.** The tokens that end an assistant turn are the generation config's `eos_token_id` (one or a list)
and the tokenizer's eos; the rollout stops on exactly these (`stop_token_ids`) and the learner sees them as sampled.

**Dates.** A template that writes a date writes the question's as-of date: `date_string` (Llama 3.x: "Today Date:
...") and `strftime_now` are passed to every render, so no prompt ever carries the day it was rendered on. A question
without a date (synthetic ones) gets `UNDATED`, fixed, so a prompt never changes with the day it is run.

**Tools.** Schemas reach the model through the template (`tools=`), or, for a template that ignores them
(SmolLM2's), through a system message in Hermes's layout (`model.tool_prompt: hermes_system`); a template that
ignores them is never used with tools silently (`ChatFormatError`). Calls are read by the vLLM tool parser of the
model's family (`model.tool_parser`, `auto` picks it from the template), then validated by `tool_calls.validate`.

**Tool turns.** The tokens between the model's end-of-turn token and its next turn are rendered by the template
after a sentinel assistant turn, and cut there: the text after the sentinel turn's end-of-turn string (Qwen's `\\n`
after `<|im_end|>` included: the model never samples it). The model's own turns stay as sampled. A template that
renders an earlier turn differently once a tool result follows (Qwen3 drops an empty `<think>` block) is *not
prefix-preserving*: the trajectory still holds exactly what the sampler saw, but a fresh render of the conversation
would not reproduce it; `prefix_preserving` says which, and `forecast-grpo model check` reports it.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
from pathlib import Path

from rollout import tool_calls
from rollout.tool_calls import BadCall, Call

UNDATED = dt.date(2024, 1, 1)
"""The date a template is given for a question without one (synthetic questions)."""
SENTINEL = "forecast-grpo-sentinel-turn"
PROBE_TOOL = "forecast_grpo_probe_tool"
TOOL_PROMPTS = ("template", "hermes_system")
HERMES_SYSTEM = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                 "with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each "
                 "function call, return a json object with function name and arguments within <tool_call></tool_call>"
                 " XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
                 "</tool_call>")
"""`model.tool_prompt: hermes_system`: the schemas as Qwen2.5's template writes them, one JSON object per line."""
# template text -> vLLM tool parser (`model.tool_parser: auto`), first match wins
PARSER_MARKERS = (("<tool_call>", "hermes"), ("<|tool_call_start|>", "lfm2"), ("<|python_tag|>", "llama3_json"),
                  ("[TOOL_CALLS]", "mistral"))
# what starts a call in each format we pattern-match: text with it that parses to no call is a malformed call
CALL_MARKERS = {"hermes": "<tool_call>", "lfm2": "<|tool_call_start|>", "llama3_json": "<|python_tag|>",
                "mistral": "[TOOL_CALLS]"}


def _silence(record: logging.LogRecord) -> bool:
    return False


class ChatFormatError(ValueError):
    """The model's chat template cannot do what the config asks; the message says why and what to set."""


def constrained_patterns(fmt: "ChatFormat", task) -> tuple[str | None, str | None]:
    """What `task.answer: constrained` and `task.tool_choice: required` (`rollout.config.TaskConfig`) constrain turns
    to: (a call, an answer), each None where nothing is constrained. Raises ChatFormatError where the model's call
    format has no pattern."""
    from rollout.scoring import answer_pattern

    answer = answer_pattern(task.reasoning) if task.answer == "constrained" else None
    call = fmt.call_pattern() if fmt.kinds and (task.tool_choice == "required" or answer) else None
    return call, answer


def end_of_turn_ids(tokenizer, model_path: str | None) -> list[int]:
    """The generation config's eos ids (where a model folder or hub id has one) and the tokenizer's eos."""
    ids: list[int] = []
    if model_path is not None:
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's eos alone
            eos = None
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


class ChatFormat:
    """One model's chat format for a task's tools (`kinds`; [] for single-turn prompts)."""

    def __init__(self, tokenizer, kinds: list[str], *, model_path: str | None = None, chat_template: str | None = None,
                 tool_parser: str = "auto", tool_prompt: str = "template"):
        if chat_template is not None:  # model.chat_template: a Jinja file replacing the tokenizer's own
            tokenizer.chat_template = Path(chat_template).read_text()
        if not tokenizer.chat_template:
            raise ChatFormatError("the tokenizer has no chat template: set model.chat_template to a Jinja file")
        if tool_prompt not in TOOL_PROMPTS:
            raise ChatFormatError(f"model.tool_prompt {tool_prompt!r}: one of {', '.join(TOOL_PROMPTS)}")
        self.tokenizer, self.kinds, self.tool_prompt = tokenizer, list(kinds), tool_prompt
        self.schemas = tool_calls.schemas(self.kinds)
        self.functions = tool_calls.functions(self.kinds)
        self.end_ids = end_of_turn_ids(tokenizer, model_path)
        if not self.end_ids:
            raise ChatFormatError("the model names no end-of-turn token (no eos in its generation config or "
                                  "tokenizer): generation would never stop")
        self.end_texts = [tokenizer.convert_ids_to_tokens(i) for i in self.end_ids]
        self.renders_tools = self._renders_tools()
        self.parser_name, self._parser, self._request = None, None, None
        self.suffix_start, self.turn_end_id, self.prefix_preserving = "", None, True
        if self.kinds:
            self._check_tools_reach_the_model()
            self.parser_name = self._pick_parser(tool_parser)
            self._parser, self._request = self._make_parser(self.parser_name)
            self.suffix_start, self.turn_end_id, self.prefix_preserving = self._tool_turn_layout()
            name, args = next(iter(self.functions.items()))
            self.call_example = self.call_text(name, {f: "..." for f in args[0].model_fields})
        self._suffix_ids = functools.lru_cache(maxsize=4096)(self._suffix_ids)
        self.cut = functools.lru_cache(maxsize=4096)(self.cut)

    @classmethod
    def for_model(cls, model_cfg, kinds: list[str], path: str | None = None, tokenizer=None) -> "ChatFormat":
        """From the job's `model` section (`rollout.config.ModelConfig`); `path` where the weights were loaded
        from another folder (a checkpoint)."""
        from transformers import AutoTokenizer

        path = path or model_cfg.path
        return cls(tokenizer or AutoTokenizer.from_pretrained(path), kinds, model_path=path,
                   chat_template=model_cfg.chat_template, tool_parser=model_cfg.tool_parser,
                   tool_prompt=model_cfg.tool_prompt)

    # ------------------------------------------------------------------ rendering

    def render(self, messages: list[dict], as_of: dt.date | None, *, tools: bool,
               add_generation_prompt: bool = True) -> str:
        """The conversation as the template writes it, with the tools if `tools`, dated `as_of`."""
        date = as_of or UNDATED
        noon = dt.datetime.combine(date, dt.time(12))
        schemas = self.schemas if tools and self.kinds else None
        if schemas and self.tool_prompt == "hermes_system":
            messages = [{"role": "system", "content": self.hermes_system_prompt()}, *messages]
            schemas = None
        return self.tokenizer.apply_chat_template(
            messages, tools=schemas, tokenize=False, add_generation_prompt=add_generation_prompt,
            date_string=date.strftime("%d %b %Y"), strftime_now=noon.strftime)

    def hermes_system_prompt(self) -> str:
        return HERMES_SYSTEM.format(tools="\n".join(json.dumps(s, ensure_ascii=False) for s in self.schemas))

    def ids(self, text: str) -> list[int]:
        """Rendered text as ids: the template wrote every special token (a BOS included) itself."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, user: str, as_of: dt.date | None, tools: bool) -> list[int]:
        return self.ids(self.render([{"role": "user", "content": user}], as_of, tools=tools))

    # ------------------------------------------------------------------ tool calls

    def parse_calls(self, text: str) -> list[Call | BadCall]:
        """Every call in one assistant turn (decoded with its special tokens), validated; [] when it calls
        nothing. A turn that starts a call the parser cannot read is one `invalid_json` bad call."""
        if self._parser is None:
            return []
        info = self._parser.extract_tool_calls(text, self._request)
        if info.tools_called:
            return [tool_calls.validate(tc.function.name, tc.function.arguments, self.functions)
                    for tc in info.tool_calls]
        marker = CALL_MARKERS.get(self.parser_name)
        if marker and marker in text:
            return [BadCall("invalid_json", f"a tool call that does not parse; a call is written {self.call_example}")]
        return []

    def call_text(self, name: str, args: dict) -> str:
        """One call as the model should write it (the warm start's targets, `model check`'s self-test)."""
        if self.tool_prompt == "hermes_system":
            call = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
            return f"<tool_call>\n{call}\n</tool_call>"
        user = [{"role": "user", "content": "x"}]
        head = self.render(user, None, tools=True)
        call = {"type": "function", "function": {"name": name, "arguments": args}}
        full = self.render([*user, {"role": "assistant", "content": "", "tool_calls": [call]}], None, tools=True,
                           add_generation_prompt=False)
        if not full.startswith(head):
            raise ChatFormatError("the template renders a tool call's turn differently from its generation prompt")
        body = full[len(head):]
        end, _ = self._find_end(body, 0)
        return body[:end].rstrip("\n")

    def call_pattern(self) -> str:
        """A regular expression for one call (`task.tool_choice: required` constrains a first turn to it)."""
        if self.parser_name != "hermes":
            raise ChatFormatError(f"task.tool_choice 'required' constrains the first turn to the Hermes call format "
                                  f"(<tool_call>{{json}}</tool_call>); this model's calls are {self.parser_name}'s")
        return tool_calls.hermes_call_pattern(self.kinds)

    # ------------------------------------------------------------------ tool results

    def cut(self, content: str, max_tokens: int) -> str:
        """A result cut to `max_tokens` tokens (`rollout.max_tool_response_tokens`), marked where it was."""
        ids = self.ids(content)
        if len(ids) <= max_tokens:
            return content
        return self.tokenizer.decode(ids[:max_tokens]) + " [cut]"

    def suffix_text(self, contents: list[str]) -> str:
        """What follows an assistant turn's end-of-turn token when tool results come back: the results in the
        template's tool turn, and the next assistant turn's generation prompt."""
        dummy = [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}]
        full = self.render(dummy + [{"role": "tool", "content": c} for c in contents], None, tools=True)
        return full[self._end_at(full, full.index(SENTINEL)):]

    def suffix_ids(self, contents: list[str]) -> list[int]:
        return list(self._suffix_ids(tuple(contents)))

    def _suffix_ids(self, contents: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.ids(self.suffix_text(list(contents))))

    # ------------------------------------------------------------------ what the template can do

    def _renders_tools(self) -> bool:
        probe = [{"type": "function", "function": {"name": PROBE_TOOL, "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=probe, tokenize=False,
                                                  add_generation_prompt=True)
        return PROBE_TOOL in text

    def _check_tools_reach_the_model(self) -> None:
        if self.tool_prompt == "template" and not self.renders_tools:
            raise ChatFormatError(
                "the chat template ignores tools=: the model would never see the tools' schemas. Set "
                "model.tool_prompt: hermes_system (the schemas in a system message in Qwen2.5's layout, calls read "
                "by vLLM's hermes parser), or model.chat_template: a template that renders them")

    def _pick_parser(self, name: str) -> str:
        from vllm.tool_parsers import ToolParserManager

        if name == "auto":
            if self.tool_prompt == "hermes_system":
                return "hermes"
            for marker, parser in PARSER_MARKERS:
                if marker in self.tokenizer.chat_template:
                    return parser
            raise ChatFormatError("cannot tell this chat template's tool-call format: set model.tool_parser to one "
                                  "of vLLM's tool parsers (hermes, lfm2, llama3_json, pythonic, mistral, ...)")
        if name not in ToolParserManager.list_registered():
            raise ChatFormatError(f"model.tool_parser {name!r} is not one of vLLM's tool parsers: "
                                  f"{', '.join(sorted(ToolParserManager.list_registered()))}")
        return name

    def _make_parser(self, name: str):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.tool_parsers import ToolParserManager

        cls = ToolParserManager.get_tool_parser(name)
        # the parsers log every malformed call at ERROR with a traceback; we count them instead (a filter: vLLM's
        # logging setup, when an engine starts, resets its loggers' levels)
        parser_log = logging.getLogger(cls.__module__)
        if _silence not in parser_log.filters:
            parser_log.addFilter(_silence)
        try:
            parser = cls(self.tokenizer)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ChatFormatError(f"vLLM's {name} tool parser does not fit this tokenizer: {e}") from None
        request = ChatCompletionRequest(model="forecast-grpo", messages=[{"role": "user", "content": "x"}],
                                        tools=self.schemas)
        return parser, request

    def _find_end(self, text: str, start: int) -> tuple[int, str]:
        """Where the first end-of-turn token's text at or after `start` is, and which it is."""
        found = [(i, t) for t in self.end_texts if (i := text.find(t, start)) >= 0]
        if not found:
            raise ChatFormatError(f"the template ends an assistant turn with none of the end-of-turn tokens "
                                  f"{self.end_texts}: set the generation config's eos_token_id to the token it uses")
        return min(found)

    def _end_at(self, text: str, start: int) -> int:
        """Index just after the first end-of-turn token's text at or after `start`."""
        i, token = self._find_end(text, start)
        return i + len(token)

    def _tool_turn_layout(self) -> tuple[str, int, bool]:
        """The text that starts a tool turn, the end-of-turn token a turn that called a tool must end with for that
        text to follow it, and whether earlier turns render the same once a tool result follows (prefix
        preservation)."""
        dummy = [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}]
        alone = self.render(dummy, None, tools=True, add_generation_prompt=False)
        with_tool = self.render(dummy + [{"role": "tool", "content": "result"}], None, tools=True)
        end, token = self._find_end(with_tool, with_tool.index(SENTINEL))
        suffix = with_tool[end + len(token):]
        if "result" not in suffix:
            raise ChatFormatError("the chat template drops tool results (no 'tool' role turn): the model would "
                                  "never see what its calls returned")
        preserving = alone[:self._end_at(alone, alone.index(SENTINEL))] == with_tool[:end + len(token)]
        return suffix[:suffix.index("result")], self.end_ids[self.end_texts.index(token)], preserving
