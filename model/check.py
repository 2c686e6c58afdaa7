"""`forecast-grpo model check DIR [--config JOB]`: what a user wants to know about a model before training it.

Its shape, where its turns end, whether its chat template shows it the tools and in which call format (and the
vLLM parser that reads it), whether tool turns keep earlier turns as rendered (prefix preservation), whether the
template writes the real date, the answer format's status, and a question's first prompt exactly as the model will
see it. `problems` lists what stops the job from training; the CLI exits 1 when there is one.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rollout import prompts, tool_calls
from rollout.chat_format import ChatFormat, ChatFormatError
from rollout.task import load_pool

PROBE_DATE = dt.date(2020, 1, 15)
"""The as-of date of the date check: a template that writes a date must write this one."""
ALL_TOOLS = ["wiki", "wiki_search", "news"]


@dataclass
class Report:
    model: str
    architecture: str = ""
    parameters: int = 0
    layers: int = 0
    hidden: int = 0
    vocab: int = 0
    end_of_turn: list[str] = field(default_factory=list)
    tools_configured: list[str] = field(default_factory=list)
    template_renders_tools: bool = False
    tool_prompt: str = "template"
    tool_parser: str | None = None
    tool_call_example: str | None = None
    tool_call_reads_back: bool | None = None
    tool_turn: str | None = None
    prefix_preserving: bool | None = None
    writes_today: bool = False
    writes_as_of: bool = False
    answer: str = "free"
    warm_started: dict | None = None
    format_rate: float | None = None
    format_samples: list[str] = field(default_factory=list)
    sample_question: str = ""
    sample_prompt: str = ""
    sample_prompt_tokens: int = 0
    max_model_len: int = 0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def check(cfg, sample: int = 0) -> Report:
    """cfg: a `cluster.config.JobConfig` (its model, task and rollout sections); sample: answers to draw from the
    model (one per question of the task's pool, at the rollout's temperature) to measure how often they are in
    format (with tools, a well-formed call counts)."""
    from transformers import AutoConfig, AutoTokenizer

    path = cfg.model.path
    r = Report(model=path, tools_configured=list(cfg.task.tools), tool_prompt=cfg.model.tool_prompt,
               answer=cfg.task.answer, max_model_len=cfg.rollout.max_model_len)
    _shape(r, AutoConfig.from_pretrained(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    kinds = list(cfg.task.tools) or ALL_TOOLS  # without configured tools: say what they would get
    try:
        fmt = ChatFormat.for_model(cfg.model, kinds, tokenizer=tokenizer)
    except ChatFormatError as e:
        (r.problems if cfg.task.tools else r.notes).append(f"tools: {e}")
        fmt = ChatFormat.for_model(cfg.model, [], tokenizer=tokenizer)
    r.end_of_turn = fmt.end_texts
    r.template_renders_tools = fmt.renders_tools
    if fmt.kinds:
        _tools(r, fmt, cfg)
    _dates(r, fmt)
    warm = Path(path) / "warmstart.json"
    r.warm_started = json.loads(warm.read_text()) if warm.is_file() else None
    pool = load_pool(cfg.task)
    question = pool[0]
    tools = bool(cfg.task.tools) and fmt.kinds
    user = prompts.user_message(question, cfg.task.reasoning, bool(tools))
    r.sample_question = question.id
    r.sample_prompt = fmt.render([{"role": "user", "content": user}], question.as_of, tools=bool(tools))
    r.sample_prompt_tokens = len(fmt.ids(r.sample_prompt))
    room = cfg.rollout.max_model_len - r.sample_prompt_tokens
    if room < cfg.rollout.max_new_tokens:
        r.problems.append(f"the sample prompt is {r.sample_prompt_tokens} tokens: rollout.max_model_len="
                          f"{cfg.rollout.max_model_len} leaves {room} for the answer (rollout.max_new_tokens="
                          f"{cfg.rollout.max_new_tokens})")
    if sample:
        _format_probe(r, path, fmt, pool[:sample], cfg)
    if r.answer == "free" and (r.format_rate == 0 or r.format_rate is None and not r.warm_started):
        (r.problems if r.format_rate == 0 else r.notes).append(
            "the answer format: a model that never writes <answer>p</answer> gives GRPO nothing to learn from (every "
            "group scores the same): warm start it (`forecast-grpo warmstart`) or set task.answer: constrained"
            + ("" if r.format_rate == 0 else "; `--sample 8` measures how often it does"))
    return r


def _shape(r: Report, config) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    r.architecture = (config.architectures or [type(config).__name__])[0]
    r.layers, r.hidden, r.vocab = text.num_hidden_layers, text.hidden_size, text.vocab_size
    with torch.device("meta"):  # counted without allocating a byte
        r.parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def _tools(r: Report, fmt: ChatFormat, cfg) -> None:
    r.tool_parser = fmt.parser_name
    name, (args, _) = next(iter(fmt.functions.items()))
    call = {f: "Example" for f in args.model_fields}
    r.tool_call_example = fmt.call_text(name, call)
    r.tool_call_reads_back = fmt.parse_calls(r.tool_call_example) == [tool_calls.Call(name, call)]
    r.tool_turn = fmt.suffix_text(["<the tool's answer>"])
    r.prefix_preserving = fmt.prefix_preserving
    if not r.tool_call_reads_back:
        r.problems.append(f"tools: vLLM's {fmt.parser_name} parser does not read back the call the template writes "
                          f"({r.tool_call_example!r}): set model.tool_parser")
    if not fmt.prefix_preserving:
        r.notes.append("tool turns: the template renders an earlier turn differently once a tool result follows "
                       "(Qwen3: an empty <think> block is dropped); each turn is kept as the model sampled it, so "
                       "training sees what the sampler saw, but a fresh render of the conversation differs")
    if cfg.task.tools and (cfg.task.tool_choice == "required" or cfg.task.answer == "constrained"):
        try:
            fmt.call_pattern()
        except ChatFormatError as e:
            r.problems.append(f"task.tool_choice / task.answer: {e}")


def _dates(r: Report, fmt: ChatFormat) -> None:
    """Render as of PROBE_DATE and look for today's date (in the formats templates write) and for the as-of date."""
    text = fmt.render([{"role": "user", "content": "x"}], PROBE_DATE, tools=bool(fmt.kinds))
    formats = ("%Y-%m-%d", "%d %b %Y", "%d %B %Y", "%B %d, %Y", "%b %d, %Y", "%m/%d/%Y")
    today = dt.date.today()
    r.writes_today = any(today.strftime(f) in text for f in formats)
    r.writes_as_of = any(PROBE_DATE.strftime(f) in text for f in formats)
    if r.writes_today:
        r.problems.append("the chat template writes today's date into the prompt: a forecaster would be told the "
                          "present. Give it a template that takes date_string or strftime_now (model.chat_template)")


def _format_probe(r: Report, path: str, fmt: ChatFormat, questions, cfg) -> None:
    """One answer per question sampled as the warm start measures (its `measure`): the share in format."""
    import torch
    from transformers import AutoModelForCausalLM

    from model.warmstart import measure

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m = measure(model, fmt if cfg.task.tools else ChatFormat.for_model(cfg.model, [], tokenizer=fmt.tokenizer),
                questions, cfg, seed=cfg.run.seed)
    r.format_rate, r.format_samples = m["format_rate"], m["texts"]


def render(r: Report) -> str:
    """The report as a reader wants it: facts first, then what to do."""
    yes = {True: "yes", False: "no", None: "-"}
    lines = [f"model            {r.model}",
             f"architecture     {r.architecture}: {r.parameters / 1e6:,.1f}M parameters, {r.layers} layers, hidden "
             f"{r.hidden}, vocab {r.vocab:,}",
             f"end of turn      {', '.join(r.end_of_turn)}",
             f"tools            configured: {', '.join(r.tools_configured) or 'none'}; the template renders tool "
             f"schemas: {yes[r.template_renders_tools]}; model.tool_prompt: {r.tool_prompt}"]
    if r.tool_parser:
        lines += [f"tool calls       vLLM parser {r.tool_parser}; written as {r.tool_call_example!r}; read back: "
                  f"{yes[r.tool_call_reads_back]}",
                  f"tool turn        {r.tool_turn!r}",
                  f"prefix-preserving {yes[r.prefix_preserving]} (trajectories are token-exact either way: turns "
                  "are kept as sampled)"]
    lines.append(f"dates            writes today's date: {yes[r.writes_today]}; writes the as-of date: "
                 f"{yes[r.writes_as_of]}")
    answer = f"task.answer: {r.answer}; warm start: " + (
        f"yes ({r.warm_started.get('steps')} steps, {r.warm_started.get('format_rate_after')} in format after)"
        if r.warm_started else "no")
    if r.format_rate is not None:
        answer += f"; {100 * r.format_rate:.0f}% of {len(r.format_samples)} sampled answers in format"
        answer += "".join(f"\n                   {t!r}" for t in r.format_samples[:3])
    lines.append(f"answer format    {answer}")
    lines.append(f"sample prompt    {r.sample_question}: {r.sample_prompt_tokens} tokens of rollout.max_model_len "
                 f"{r.max_model_len}, exactly as the model sees it:")
    lines += ["    " + ln for ln in r.sample_prompt.splitlines()]
    lines += [f"note: {n}" for n in r.notes]
    lines += [f"PROBLEM: {p}" for p in r.problems]
    lines.append("ready to train" if not r.problems else f"cannot train as configured: {len(r.problems)} problem(s)")
    return "\n".join(lines)
