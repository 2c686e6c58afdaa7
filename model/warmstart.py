"""The format warm start (`forecast-grpo warmstart`): a short supervised run that teaches any model the answer format,
and with tools the call format, before GRPO, and nothing about the truth.

Why: GRPO learns from the differences within a group of samples. A model that never writes `<answer>p</answer>`
(SmolLM2-135M-Instruct: 0% of its samples) gets the format penalty for every sample, every group has zero variance,
and the gradient is 0.

What it trains on (`warmstart:` in the job config, `model/config.py`):
- the job's own training questions (`rollout.task.load_pool(cfg.task)`, never the evaluation ones), rendered as the
  rollout renders them: `prompts.user_message` in the model's own chat template (`ChatFormat`, so
  `model.chat_template` and `model.tool_prompt` apply), with the tools' schemas where the task has tools;
- targets `<answer>p</answer>` with p drawn uniformly from 0.01 ... 0.99, independent of the question, around a
  belief the question's text hashes to, or around the training questions' base rate (`warmstart.forecasts`,
  `draw_forecast`): the answers carry no information about any one question's truth, so whatever skill the model
  shows after GRPO is GRPO's. (With `task.reasoning` the target is still the bare answer, which parses there too:
  the warm start teaches where the answer goes, not how to reason.);
- with tools, a share of the examples (`warmstart.tool_call_rate`) first calls a tool in the model's own call format
  (`ChatFormat.call_text`, read back by the model's tool parser before it is used), gets a real answer from the tool
  service (started in this process from the job's `tools:` section, run as of the question's date by
  `tool_calls.run_call`, as the rollout runs it), rendered as the rollout renders it (`ChatFormat.suffix_ids`, cut
  to `rollout.max_tool_response_tokens`), and then answers. Which call: `guess_call`;
- the loss is on the model's own tokens only: each assistant turn, ending in the token the rollout stops at
  (`ChatFormat.turn_end_id` with tools, the first of `ChatFormat.end_ids` without). Prompts and tool results are
  context.

The result is written to `model.path` through a folder beside it, renamed into place at the end (never half a
folder): weights (safetensors), the tokenizer with the chat template it used, generation_config.json (eos: the end
ids), and `warmstart.json` (what it was made from, the losses, and the share of sampled answers in format before and
after, `measure`). A second run with the same inputs does nothing (`ensure`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rollout import evaluate, prompts, tool_calls
from rollout.chat_format import UNDATED, ChatFormat, ChatFormatError
from rollout.questions import Question
from rollout.tool_calls import Call

INFO = "warmstart.json"
GRAD_CLIP = 1.0
"""The first steps' gradients are the largest (the format is unlikely under the base model: SmolLM2's loss is 1.8 at
the first step, 0.4 six steps later); clipping keeps those steps no larger than the rest."""
SAMPLES_KEPT = 8
"""Sampled answers after the warm start kept in warmstart.json, to read what the model now writes."""
MAX_QUERY_WORDS = 6
_WORD = re.compile(r"\w+(?:['.&-]\w+)*")
# Capitalised at the start of a question whatever follows them: they start no title.
_OPENERS = frozenset("A An The Will Would What Which Who Whom Whose When Where Why How Is Are Was Were Does Do Did Has "
                     "Have Had Can Could Should Shall May Might Must If By In On At Before After".split())
_STOP = frozenset("a an the of to in on at by for with from and or not is are was were be been being will would what "
                  "which who whom when where why how that this these those it its than then there their whether "
                  "does do did has have had can could should shall may might must if before after".split())


class WarmstartError(ValueError):
    """A warm start that cannot be done as configured; the message names the key and the reason."""


def draw_forecast(q: Question, rng: random.Random, ws, base: float | None) -> float:
    """A target forecast in 0.01 ... 0.99 (steps of 0.01), never informed by one question's truth
    (`warmstart.forecasts`): uniform whatever the question; or the question's own opinion (`opinion`), or `base`,
    the training questions' best constant (`base_rate`), give or take `opinion_spread`."""
    if ws.forecasts == "uniform":
        return rng.randint(1, 99) / 100
    if ws.forecasts == "base_rate":
        belief = base
    else:
        key = hashlib.sha256(f"{ws.seed}/{q.text}".encode()).digest()
        belief = 0.05 + 0.9 * int.from_bytes(key[:4], "big") / 2**32
    return min(99, max(1, round(100 * (belief + rng.uniform(-ws.opinion_spread, ws.opinion_spread))))) / 100


def guess_title(text: str) -> str | None:
    """A page to look up for a question: the longest run of capitalised words in it, where a number may continue a
    run ("Player 620", "Apollo 11") and the words questions open with (Will, What, The, ...) start none; None when
    there is no such run. "What is the probability that Player 620 wins the next roll of the die?" gives "Player
    620", the tool world's page; "Will the Federal Reserve cut rates before July?" gives "Federal Reserve". A guess is
    enough: the warm start teaches the call's format, and GRPO learns which pages help."""
    runs, run = [], []
    for word in _WORD.findall(text):
        if (word[0].isupper() and (run or word not in _OPENERS)) or (run and word.isdigit()):
            run.append(word)
        else:
            runs.append(run)
            run = []
    best = max([*runs, run], key=len)
    return " ".join(best) or None


def key_words(text: str) -> str:
    """A search query for a question: its first words that are not function words."""
    return " ".join([w for w in _WORD.findall(text) if w.lower() not in _STOP][:MAX_QUERY_WORDS])


def guess_call(q: Question, fmt: ChatFormat, rng: random.Random) -> Call:
    """A call of one of the task's tools (drawn) for a question: `wiki` for `guess_title`'s page (the key words where
    there is none), `wiki_search` and `news` for its key words."""
    name = rng.choice(sorted(fmt.functions))
    args_model = fmt.functions[name][0]
    value = (guess_title(q.text) or key_words(q.text)) if "title" in args_model.model_fields else key_words(q.text)
    (field,) = args_model.model_fields  # every tool takes one argument (rollout/tool_calls.py)
    return Call(name, {field: value})


@dataclass
class Example:
    """One conversation laid out as the rollout lays it out: token segments, each the model's own turn (trained on)
    or context (the prompt, a tool result)."""

    question: Question
    forecast: float
    segments: list[tuple[list[int], bool]]
    call: Call | None = None
    result: tool_calls.Result | None = None


def make_examples(cfg, fmt: ChatFormat, pool: list[Question], n: int, rng: random.Random
                  ) -> tuple[list[Example], Counter]:
    """n examples on questions drawn from the pool; with tools, their calls run through the tool service (started
    here from `cfg.tools`, stopped before returning). Also returns the calls' errors by kind."""
    tools = bool(fmt.kinds)
    end = fmt.turn_end_id if tools else fmt.end_ids[0]
    plans, base = [], None  # everything drawn first, so the calls can all run at once
    if cfg.warmstart.forecasts == "base_rate":
        try:  # the constant the held-out evaluation calls the best: the mean market, else the base rate
            base = evaluate.best_constant(pool)[0]
        except ValueError as e:
            raise WarmstartError(f"warmstart.forecasts=base_rate: {e}") from None
    for _ in range(n):
        q = rng.choice(pool)
        forecast = draw_forecast(q, rng, cfg.warmstart, base)
        call = guess_call(q, fmt, rng) if tools and rng.random() < cfg.warmstart.tool_call_rate else None
        plans.append((q, forecast, call))
    results = iter(_run_calls(cfg, fmt, [(q, call) for q, _, call in plans if call is not None]))
    out, errors, prompt_ids = [], Counter(), {}
    for q, forecast, call in plans:
        if q.id not in prompt_ids:
            prompt_ids[q.id] = fmt.prompt_ids(prompts.user_message(q, cfg.task.reasoning, tools), q.as_of, tools)
        segments = [(prompt_ids[q.id], False)]
        result = next(results) if call is not None else None
        if result is not None:
            errors.update([result.error] if result.error else [])
            segments += [(fmt.ids(fmt.call_text(call.name, call.args)) + [end], True),
                         (fmt.suffix_ids([fmt.cut(result.content, cfg.rollout.max_tool_response_tokens)]), False)]
        segments.append((fmt.ids(f"<answer>{forecast:.2f}</answer>") + [end], True))
        out.append(Example(q, forecast, segments, call, result))
    return out, errors


def _run_calls(cfg, fmt: ChatFormat, calls: list[tuple[Question, Call]]) -> list[tool_calls.Result]:
    """Each call's result, through a tool service run in this process, as the rollout runs calls: read back by the
    model's tool parser first, then run as of the question's date."""
    if not calls:
        return []
    from tools.client import ToolClient
    from tools.service import serve_in_thread

    for _, call in calls:
        text = fmt.call_text(call.name, call.args)
        if fmt.parse_calls(text) != [call]:  # the warm start must not teach calls the rollout cannot read
            raise ChatFormatError(f"vLLM's {fmt.parser_name} tool parser does not read back the call the template "
                                  f"writes ({text!r}): set model.tool_parser")

    async def run_all(url: str) -> list[tool_calls.Result]:
        client = ToolClient(url, timeout_s=cfg.tools.service.request_timeout_s)
        try:
            return await asyncio.gather(*(tool_calls.run_call(call, client, q.as_of or UNDATED, fmt.kinds)
                                          for q, call in calls))
        finally:
            await client.aclose()

    service = serve_in_thread(cfg.tools)
    try:
        return asyncio.run(run_all(service.url))
    finally:
        service.stop()


def collate(examples: list[Example], pad_id: int):
    """Right-padded input ids, attention mask, and the loss mask (1 on the model's own tokens)."""
    import torch

    ids = [[i for seg, _ in ex.segments for i in seg] for ex in examples]
    own = [[int(mine) for seg, mine in ex.segments for _ in seg] for ex in examples]
    width = max(map(len, ids))
    return (torch.tensor([x + [pad_id] * (width - len(x)) for x in ids]),
            torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            torch.tensor([x + [0] * (width - len(x)) for x in own], dtype=torch.float32))


def _loss(model, ids, attention, own):
    """The mean cross entropy of the model's own tokens. Logits are computed only at the positions that predict one
    (in any row of the batch): projecting every prompt token onto SmolLM2's 49k-word vocabulary took a fifth (dice)
    to a third (tool-world prompts) of a step."""
    import torch

    at = own[:, 1:].any(0).nonzero().squeeze(1)  # position t predicts token t + 1
    logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=at).logits
    weight = own[:, at + 1]
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids[:, at + 1], reduction="none")
    return (nll * weight).sum() / weight.sum()


def measure(model, fmt: ChatFormat, questions: list[Question], cfg, seed: int) -> dict:
    """One answer sampled per question (transformers, at the rollout's temperature and top_p, at most
    `rollout.max_new_tokens`, stopped on the end ids), with the tools' schemas in the prompt where the task has
    tools: the share that parses as the task's answer (`answer_rate`), the share that is a well-formed call in the
    model's format (`call_rate`, None without tools), both together (`format_rate`), and the texts (special tokens
    kept)."""
    import torch

    from rollout.scoring import parse_answer

    tools = bool(fmt.kinds)
    ids = [fmt.prompt_ids(prompts.user_message(q, cfg.task.reasoning, tools), q.as_of, tools) for q in questions]
    width, pad = max(map(len, ids)), fmt.end_ids[0]
    device = next(model.parameters()).device
    inputs = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)  # left-padded: generate
    attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        # the rollout's sampler (vLLM, as the rollout calls it) has no top-k and no repetition penalty, whatever
        # the model's generation config says (Qwen2.5's: top_k 20, repetition_penalty 1.05; transformers: top_k 50)
        out = model.generate(inputs, attention_mask=attention, do_sample=True, temperature=cfg.rollout.temperature,
                             top_p=cfg.rollout.top_p, top_k=0, repetition_penalty=1.0,
                             max_new_tokens=cfg.rollout.max_new_tokens, eos_token_id=fmt.end_ids, pad_token_id=pad)
    answers, calls, texts = 0, 0, []
    for row in out[:, width:].tolist():
        turn = row[:next((i for i, t in enumerate(row) if t in fmt.end_ids), len(row))]
        raw = fmt.tokenizer.decode(turn)  # as the rollout decodes a turn for the tool parser
        text = fmt.tokenizer.decode(turn, skip_special_tokens=True)  # ... and for the answer
        called = fmt.parse_calls(raw)
        answers += parse_answer(text, not cfg.task.reasoning) is not None
        calls += bool(called) and all(isinstance(c, Call) for c in called)
        texts.append(raw)
    n = len(questions)
    return {"format_rate": (answers + calls) / n, "answer_rate": answers / n, "call_rate": calls / n if tools else None,
            "texts": texts}


def inputs(cfg) -> dict:
    """What a warm start's result depends on: a folder made from the same is up to date (`ensure`)."""
    return {"base": cfg.warmstart.base, "warmstart": cfg.warmstart.model_dump(),
            "task": cfg.task.model_dump(include={"source", "families", "split", "data", "train_before", "reasoning",
                                                 "tools"}),
            "chat": cfg.model.model_dump(include={"chat_template", "tool_parser", "tool_prompt"}),
            "rollout": cfg.rollout.model_dump(include={"max_tool_response_tokens", "max_model_len", "max_new_tokens"})}


def _check_paths(cfg, force: bool) -> tuple[str, Path]:
    base, out = cfg.warmstart.base, Path(cfg.model.path)
    if base is None:
        raise WarmstartError("warmstart.base is not set: name the model to warm-start (a folder or hub id); the result "
                             "is written to model.path")
    b = Path(base).expanduser()
    # transformers retries the hub for a minute before it says a folder is missing: a name that can only be a path
    # (absolute, ./, three parts, or under a folder that exists here) is checked here instead
    looks_local = b.is_absolute() or base.startswith((".", "~")) or len(b.parts) > 2 or (
        len(b.parts) == 2 and Path(b.parts[0]).is_dir())
    if looks_local and not b.is_dir():
        raise WarmstartError(f"warmstart.base {base!r}: no such folder")
    if b.exists() and b.resolve() == out.resolve():
        raise WarmstartError(f"warmstart.base and model.path are the same folder ({out}): the warm start writes "
                             "model.path; set it to a new folder")
    if out.exists() and any(out.iterdir()) and not (out / INFO).is_file() and not force:
        raise WarmstartError(f"model.path {out} exists and is not a warm start (no {INFO}): set model.path to a new "
                             "folder, or pass --force to replace it")
    return base, out


def warm_start(cfg, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Build `cfg.model.path` from `cfg.warmstart.base` (module docstring); returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.task import load_pool

    base, out = _check_paths(cfg, force)
    ws = cfg.warmstart
    t0 = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as e:
        raise WarmstartError(f"warmstart.base {base!r}: {e}") from None
    fmt = ChatFormat.for_model(cfg.model, list(cfg.task.tools), path=base, tokenizer=tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # fp32 weights everywhere: in bf16 an update of lr 5e-5 is below the weights' resolution and is lost. On a GPU
    # the forward and backward run in bf16 (autocast).
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    pool = _fitting(load_pool(cfg.task), fmt, cfg, log)
    source = ", ".join(cfg.task.families) if cfg.task.source == "synthetic" else cfg.task.data
    tools = f"; tools {', '.join(fmt.kinds)}, {ws.tool_call_rate:.0%} of examples call one" if fmt.kinds else ""
    log(f"warm start: {base} -> {out} on {device}: {ws.steps} steps of {ws.batch_size} examples from {len(pool)} "
        f"training questions ({source}{tools})")

    mrng = random.Random(f"{ws.seed}/measure")
    probe = mrng.sample(pool, ws.measure) if ws.measure <= len(pool) else mrng.choices(pool, k=ws.measure)
    before = measure(model.eval(), fmt, probe, cfg, ws.seed) if ws.measure else None
    if before:
        log(f"before: {_rates(before, ws.measure)}")

    examples, errors = make_examples(cfg, fmt, pool, ws.steps * ws.batch_size, random.Random(ws.seed))
    n_calls = sum(ex.call is not None for ex in examples)
    if n_calls:
        log(f"tool calls: {n_calls}, answered with an error: {sum(errors.values())}"
            + "".join(f", {k} {v}" for k, v in errors.most_common()))

    torch.manual_seed(ws.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr)
    model.train()
    losses, t_train = [], time.time()
    every = max(1, ws.steps // 20)
    for step in range(ws.steps):
        batch = examples[step * ws.batch_size:(step + 1) * ws.batch_size]
        ids, attention, own = (t.to(device) for t in collate(batch, fmt.end_ids[0]))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = _loss(model, ids, attention, own)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % every == 0 or step == ws.steps - 1:
            per_step = (time.time() - t_train) / (step + 1)
            log(f"warm start step {step + 1}/{ws.steps} loss {losses[-1]:.4f} {per_step:.1f} s/step "
                f"ETA {per_step * (ws.steps - step - 1):.0f} s")
    model.eval()
    after = measure(model, fmt, probe, cfg, ws.seed) if ws.measure else None
    if after:
        log(f"after: {_rates(after, ws.measure)}")

    info = {**inputs(cfg), "steps": ws.steps, "examples": len(examples), "tool_calls": n_calls,
            "tool_errors": dict(errors), "loss_first": losses[0], "loss_last": losses[-1], "measured": ws.measure,
            **{f"{key}_{when}": (m[key] if m else None) for when, m in (("before", before), ("after", after))
               for key in ("format_rate", "answer_rate", "call_rate")},
            "samples_after": after["texts"][:SAMPLES_KEPT] if after else [],
            "seconds": round(time.time() - t0, 1), "device": device, "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    _save(model, tokenizer, fmt, out, info)
    log(f"warm-started model saved to {out} in {time.time() - t0:.0f} s")
    return out


def _fitting(pool: list[Question], fmt: ChatFormat, cfg, log) -> list[Question]:
    """The questions whose prompts leave room for an answer in rollout.max_model_len, as the rollout samples only
    those (`rollout.worker.MIN_ANSWER_TOKENS`): a warm start on the others would teach what is never asked."""
    from rollout.worker import MIN_ANSWER_TOKENS

    tools = bool(fmt.kinds)
    room = cfg.rollout.max_model_len - min(MIN_ANSWER_TOKENS, cfg.rollout.max_new_tokens)
    fits = [q for q in pool
            if len(fmt.prompt_ids(prompts.user_message(q, cfg.task.reasoning, tools), q.as_of, tools)) <= room]
    if len(fits) < len(pool):
        log(f"{len(pool) - len(fits)} of {len(pool)} training questions are left out: their prompts do not fit "
            f"rollout.max_model_len={cfg.rollout.max_model_len}")
    if not fits:
        raise WarmstartError(f"no training question's prompt fits rollout.max_model_len={cfg.rollout.max_model_len}")
    return fits


def _rates(m: dict, n: int) -> str:
    calls = "" if m["call_rate"] is None else f" (answers {m['answer_rate']:.0%}, calls {m['call_rate']:.0%})"
    return f"{m['format_rate']:.0%} of {n} sampled answers in format{calls}, e.g. {m['texts'][0]!r}"


def _save(model, tokenizer, fmt: ChatFormat, out: Path, info: dict) -> None:
    """Everything into a hidden folder beside out, renamed into place at the end: never half a folder at out."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.warmstart.", dir=out.parent))
    try:
        staged = work / "model"
        model.generation_config.eos_token_id = fmt.end_ids[0] if len(fmt.end_ids) == 1 else fmt.end_ids
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)  # with the chat template the examples were rendered in
        (staged / INFO).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            out.rename(work / "old")  # goes away with the work folder, once the new one is in place
        staged.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def up_to_date(cfg) -> bool:
    """model.path holds a warm start made from the same inputs (`inputs`)."""
    info = Path(cfg.model.path) / INFO
    try:
        got = json.loads(info.read_text())
    except (OSError, ValueError):
        return False
    want = inputs(cfg)
    return {k: got.get(k) for k in want} == want


def ensure(cfg, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """The warm start at model.path: kept if it was made from the same inputs, built otherwise (or with force)."""
    if not force and up_to_date(cfg):
        log(f"{cfg.model.path} is already warm-started from {cfg.warmstart.base} with this config; nothing to do "
            "(--force builds it again)")
        return Path(cfg.model.path)
    return warm_start(cfg, force=force, log=log)
