"""Real chat templates (`../shared/chat-templates`: Qwen2.5, Qwen3, LFM2.5, SmolLM2) through what the rollout does
with them: prompts with the tools' schemas, tool turns as tokens, calls read by vLLM's tool parser for the family,
dates. With SmolLM2's real tokenizer (conftest's `smollm2`: the imported model)."""

import datetime as dt

import pytest
from conftest import SHARED, needs_shared

from rollout.chat_format import ChatFormat, ChatFormatError
from rollout.tool_calls import BadCall, Call

TEMPLATES = SHARED / "chat-templates"
pytestmark = needs_shared(TEMPLATES)
KINDS = ["wiki", "news"]


def fmt(smollm2, template: str | None, kinds=KINDS, **kw) -> ChatFormat:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    if template == "lfm2_2_5":  # LFM2.5's call markers are special tokens of its own tokenizer
        tok.add_special_tokens({"additional_special_tokens": ["<|tool_call_start|>", "<|tool_call_end|>"]})
    path = str(TEMPLATES / f"{template}.jinja") if template else None
    return ChatFormat(tok, kinds, model_path=str(smollm2), chat_template=path, **kw)


@pytest.mark.parametrize("template,tool_prompt,parser,tool_turn,preserving", [
    ("qwen2_5", "template", "hermes", "\n<|im_start|>user\n<tool_response>\n", True),
    ("qwen3", "template", "hermes", "\n<|im_start|>user\n<tool_response>\n", False),
    ("lfm2_2_5", "template", "lfm2", "\n<|im_start|>tool\n", True),
    ("smollm2", "hermes_system", "hermes", "\n<|im_start|>tool\n", True),
])
def test_each_family_gets_its_parser_and_tool_turn(smollm2, template, tool_prompt, parser, tool_turn, preserving):
    f = fmt(smollm2, template, tool_prompt=tool_prompt)
    assert (f.parser_name, f.suffix_start, f.prefix_preserving) == (parser, tool_turn, preserving)
    assert f.end_texts == ["<|im_end|>"] and f.turn_end_id == 2  # from the generation config, not a literal
    # the schemas reach the model, in the template's layout or the documented system message
    prompt = f.render([{"role": "user", "content": "Q?"}], dt.date(2025, 3, 1), tools=True)
    assert '"name": "wiki"' in prompt and '"name": "news"' in prompt
    # the parser reads back the call as the model's own template writes it
    for name, args in (("wiki", {"title": "2024 Summer Olympics"}), ("news", {"query": "Kato election"})):
        assert f.parse_calls(f.call_text(name, args)) == [Call(name, args)]
    assert f.parse_calls("<answer>0.4</answer>") == []
    # a tool turn is the template's, with the generation prompt after it, and tokenizes to the same ids alone
    suffix = f.suffix_text(["page text"])
    assert suffix.startswith(tool_turn) and suffix.endswith("<|im_start|>assistant\n") and "page text" in suffix
    assert f.suffix_ids(["page text"]) == f.ids(suffix)


def test_a_template_without_tools_is_refused_not_silently_used(smollm2):
    with pytest.raises(ChatFormatError, match="ignores tools=.*model.tool_prompt: hermes_system"):
        fmt(smollm2, "smollm2")
    assert fmt(smollm2, "smollm2", kinds=[]).parser_name is None  # without tools it is fine
    f = fmt(smollm2, "smollm2", tool_prompt="hermes_system")
    assert not f.renders_tools
    prompt = f.render([{"role": "user", "content": "Q?"}], None, tools=True)
    assert prompt.startswith("<|im_start|>system\n# Tools") and "<tool_call>" in prompt
    assert "You are a helpful AI assistant named SmolLM" not in prompt  # our system turn replaces the default


def test_bad_config_names_the_key(smollm2):
    with pytest.raises(ChatFormatError, match="model.tool_parser 'nonesuch' is not one of vLLM's"):
        fmt(smollm2, "qwen2_5", tool_parser="nonesuch")
    with pytest.raises(ChatFormatError, match="model.tool_prompt"):
        fmt(smollm2, "qwen2_5", tool_prompt="inline")


def _conversation(f: ChatFormat, user: str, turns: list[str], results: list[str]) -> str:
    """What the rollout builds: the prompt, each turn as sampled (ending in its end-of-turn token), and the tool
    turns between them (`suffix_text`)."""
    text = f.render([{"role": "user", "content": user}], None, tools=True)
    for i, turn in enumerate(turns):
        text += turn + "<|im_end|>"
        if i < len(results):
            text += f.suffix_text([results[i]])
    return text


@pytest.mark.parametrize("template", ["qwen2_5", "qwen3", "lfm2_2_5"])
def test_a_conversation_is_what_a_fresh_render_of_its_messages_gives(smollm2, template):
    f = fmt(smollm2, template)
    think = "<think>\nI should read the page.\n</think>\n\n" if template == "qwen3" else ""
    turns = [think + f.call_text("wiki", {"title": "Kato"}).removeprefix("<think>\n\n</think>\n\n"),
             think.replace("read the page", "answer") + "<answer>0.3</answer>"]
    built = _conversation(f, "Will Kato win?", turns, ["Kato is a runner."])
    fresh = f.render([{"role": "user", "content": "Will Kato win?"}, {"role": "assistant", "content": turns[0]},
                      {"role": "tool", "content": "Kato is a runner."}, {"role": "assistant", "content": turns[1]}],
                     None, tools=True, add_generation_prompt=False)
    assert fresh == built + "\n"  # the model stops at its last <|im_end|>; the template adds a "\n" after it


def test_qwen3_without_reasoning_is_not_prefix_preserving_but_kept_as_sampled(smollm2):
    """Qwen3 writes an empty <think> block into the last assistant turn only: once a tool result follows, a fresh
    render drops it. The rollout keeps the turn as the model sampled it, so training sees what the sampler saw."""
    f = fmt(smollm2, "qwen3")
    call = f.call_text("wiki", {"title": "Kato"})
    assert call.startswith("<think>\n\n</think>\n\n<tool_call>")  # what Qwen3 writes without reasoning
    built = _conversation(f, "Q?", [call, "<think>\n\n</think>\n\n<answer>0.3</answer>"], ["R"])
    assert built.count("<think>\n\n</think>") == 2 and not f.prefix_preserving


@pytest.mark.parametrize("text,kind", [
    ('<tool_call>{"name": "wiki", "arguments": {"title": "Kato"</tool_call>', "invalid_json"),
    ('<tool_call>["wiki"]</tool_call>', "invalid_json"),
    ('<tool_call>{"name": "wiki", "arguments": {"title": "Kato"', "invalid_json"),  # never closed
    ('<tool_call>{"name": "browse", "arguments": {"url": "http://x"}}</tool_call>', "unknown_tool"),
    ('<tool_call>{"name": "wiki", "arguments": {"title": 7}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "wiki", "arguments": {"page": "Kato"}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "wiki", "arguments": {"title": "  "}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "wiki", "arguments": "Kato"}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "wiki", "arguments": {"title": "Ka\\u0007to"}}</tool_call>', "bad_title"),
    ('<tool_call>{"name": "wiki", "arguments": {"title": "' + "x" * 600 + '"}}</tool_call>', "too_long"),
])
def test_bad_calls_become_errors_by_kind(smollm2, text, kind):
    (call,) = fmt(smollm2, "qwen2_5").parse_calls(text)
    assert isinstance(call, BadCall) and call.kind == kind, call


def test_lfm2_bad_calls_are_counted_too(smollm2):
    f = fmt(smollm2, "lfm2_2_5")
    (call,) = f.parse_calls("<|tool_call_start|>[wiki(title=]<|tool_call_end|>")
    assert isinstance(call, BadCall) and call.kind == "invalid_json" and "[wiki(title='...')]" in call.message
    assert f.parse_calls("<|tool_call_start|>[browse(url='x')]<|tool_call_end|>")[0].kind == "unknown_tool"


def test_good_calls_and_a_date_argument_dropped_with_a_note(smollm2):
    f = fmt(smollm2, "qwen2_5")
    calls = f.parse_calls('<tool_call>\n{"name": "wiki", "arguments": {"title": "Kato"}}\n</tool_call>'
                          '<tool_call>{"name": "news", "arguments": {"query": "Kato", "as_of": "2030-01-01"}}'
                          '</tool_call>')
    assert [(c.name, c.args) for c in calls] == [("wiki", {"title": "Kato"}), ("news", {"query": "Kato"})]
    assert not calls[0].note and "as_of" in calls[1].note and "ignored" in calls[1].note
    # a tool the task does not give is unknown, even if another task has it
    assert fmt(smollm2, "qwen2_5", kinds=["wiki"]).parse_calls(
        '<tool_call>{"name": "news", "arguments": {"query": "x"}}</tool_call>')[0].kind == "unknown_tool"


# Llama 3.2's system turn, as its template writes it: the real date unless given date_string.
LLAMA_DATE = ('{%- if not date_string is defined %}{%- if strftime_now is defined %}'
              '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
              '{%- endif %}{%- endif %}'
              '{{- "<|im_start|>system\\nCutting Knowledge Date: December 2023\\nToday Date: " + date_string + '
              '"<|im_end|>\\n" }}'
              '{%- for m in messages %}{{- "<|im_start|>" + m.role + "\\n" + m.content + "<|im_end|>\\n" }}'
              '{%- endfor %}'
              '{%- if add_generation_prompt %}{{- "<|im_start|>assistant\\n" }}{%- endif %}')
NOW_DATE = '{{- strftime_now("%Y-%m-%d") }}' + LLAMA_DATE


@pytest.mark.parametrize("template", [LLAMA_DATE, NOW_DATE])
def test_a_template_that_writes_a_date_writes_the_as_of_date_never_today(smollm2, tmp_path, template):
    path = tmp_path / "t.jinja"
    path.write_text(template)
    from transformers import AutoTokenizer

    f = ChatFormat(AutoTokenizer.from_pretrained(smollm2), [], model_path=str(smollm2), chat_template=str(path))
    text = f.render([{"role": "user", "content": "Q?"}], dt.date(2025, 3, 1), tools=False)
    assert "01 Mar 2025" in text
    today = dt.date.today()
    assert today.strftime("%d %b %Y") not in text and today.isoformat() not in text
    assert f.render([{"role": "user", "content": "Q?"}], None, tools=False) == \
        f.render([{"role": "user", "content": "Q?"}], None, tools=False)  # undated: fixed, never the day it runs
