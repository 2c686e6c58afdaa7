"""Build the tiny forecaster used on laptops and in CI, deterministically from a seed.

1. A byte-level BPE tokenizer trained here on the synthetic questions and some filler text, with a ChatML chat
   template in Qwen2.5's layout (`<|im_start|>role\\n...<|im_end|>\\n`), so the same prompt code serves real Qwen.
2. A random-init `Qwen2ForCausalLM` (head_dim 64: vLLM's CPU attention rejects smaller heads; tied embeddings).
3. A short supervised warm start on the answer *format*: targets are `<answer>q</answer>` with q unrelated to the
   true probability, so the model answers in format but is uncalibrated. GRPO has to learn the rest.
   Three choices stand in for the pretraining a real LLM has, and all matter (bench/README.md has the measurements):
   - each question gets a belief b (answers are b +- 0.15), as an LLM has an opinion about every question. With
     answers drawn independently of the question instead, the warm start teaches the model to ignore the question:
     its state at the answer is the same for every question (the spread across questions is 2e-6 of its norm),
     and no policy gradient learns past the best constant answer from there;
   - b is a random smooth function of the numbers in the question, so similar questions get similar (wrong)
     opinions, as in an LLM. Drawn independently per question, b taught the model to hash each question to its
     own answer, and what GRPO then learned did not carry over to die sizes never trained on (held-out skill
     -0.08 against +0.73);
   - the prompt tokens are trained on too (language modelling): the model reads the question.
   A share of examples asks for reasoning first and answers after filler text: the long-completion shape.
4. Tool use, on questions shaped like the tool world's (`rollout/tool_world.py`) but about players made up afresh
   for every example (random numbers and rules; never the world's players): with the tools in the prompt, most
   examples call `wiki` for the player's page in Qwen2.5's format, read the page as the rollout renders it (or an
   error, sometimes), and then answer; the rest answer at once. What is taught is the call and where the answer
   goes, never the right answer: the answer after a page is `page_belief`, a random smooth function of the page's
   number, unrelated to the probability it implies. So calls really happen from the first step on, and GRPO has to
   learn what the page means. Three things were needed for the model to learn even this much:
   - made-up players: the call is then a copy of the player in the question, which carries over to any player
     (trained on the world's 64 named players the model put 0.11 of its probability on the right title, and
     nothing on held-out ones), and a last phase of tool examples alone (`copy_steps`), where the copy is learned
     at once, about 200 batches in;
   - numbered players, not named ones (syllable names were never copied);
   - a low language-modelling weight on tool examples' prompts and results (`tool_lm_weight`).
   After it, the model writes the right title 98% of the time, for training and held-out players alike.

Nothing is downloaded. The result is a normal Hugging Face folder.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from rollout import prompts, synthetic, tool_calls, tool_world
from rollout.questions import Question
from tools.wikitext import plain_text

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's tool-call markers are ordinary added tokens there, too.
ADDED = ["<tool_call>", "</tool_call>"]
# ChatML in Qwen2.5's layout, tools included: the tools in a `# Tools` block of the system turn, calls as
# `<tool_call>` blocks in the assistant turn, results as `<tool_response>` blocks in one user turn. Qwen writes each
# schema as a JSON line; this model reads every prompt token on a CPU, so its block has one short line per function
# (`name(arguments): description`), from the same schemas. Without tools and without a system message nothing is
# added, so a dice prompt is exactly the TRL harness's.
TOOLS_POSTAMBLE = "\n</tools>\nCall one with <tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call>"
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n<tools>' }}"
    "{%- for tool in tools %}{%- set f = tool.function if tool.function is defined else tool %}"
    "{{- '\n' + f.name + '(' + (f.parameters.properties | list | join(', ')) + '): ' + f.description }}"
    "{%- endfor %}"
    "{{- " + repr(TOOLS_POSTAMBLE) + " + '<|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}{%- if call.function is defined %}{%- set call = call.function %}"
    "{%- endif %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + call.name + '\", \"arguments\": ' + (call.arguments | tojson) + "
    "'}\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
_FILLER = (
    "the a an of to in on at for with by from and or not is are was were be been will would should could may might "
    "must can do does did has have had this that these those which what when where who why how many much more most "
    "some any all each every both either neither none market price election vote candidate win team game season "
    "report government company rate inflation growth index year month week day today tomorrow before after "
    "forecast probability chance likely unlikely certain possible estimate expected outcome event question answer "
    "resolve resolves resolution criteria background date source news page revision article people country world "
    "first second third last next previous number count total sum half quarter percent high low rise fall"
).split()


class TinyModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    sft_steps: int = 600
    sft_batch: int = 64
    sft_lr: float = 3e-3
    lm_weight: float = 1.0
    reasoning_fraction: float = 0.2
    """Share of warm-start examples that use the reasoning prompt and write filler reasoning before the answer."""
    belief_spread: float | None = 0.15
    """None: every answer is uniformly random. A number: each question gets a 'belief' b in [0.05, 0.95] (how:
    `belief_from`), unrelated to its true probability, and answers b +- belief_spread: the model has an opinion about
    each question, as a pretrained LLM does, but an uncalibrated one."""
    belief_from: Literal["question", "numbers"] = "numbers"
    """`question`: b is drawn independently for each question (similar questions get unrelated opinions).
    `numbers`: b is a random smooth function of the numbers in the question, drawn per question template
    (sigmoid of a random linear function): similar questions get similar opinions, as in an LLM, still unrelated to
    the true probability."""
    tool_fraction: float = 0.4
    """Share of warm-start batches on made-up tool-world players (the rest are the other families)."""
    copy_steps: int = 400
    """Then this many batches of tool examples alone, at a constant `copy_lr`. Copying the player into the call is
    learned all at once, about 200 such batches in (the loss falls from 0.21 to 0.11 within 50 batches; before,
    the model writes the same number for every player); mixed into the cosine schedule above, 350 tool batches
    taught no copy at all (0.0001 of the probability on the right title)."""
    copy_lr: float = 1e-3
    tool_batch: int = 32
    """Examples per tool batch: they are five times as long as a direct answer."""
    tool_prompt_rate: float = 0.9
    """In those, the share with the tools in the prompt (the rest ask without them, as `eval --tools off` does)."""
    tool_call_rate: float = 0.85
    """With the tools in the prompt: the share of examples that call `wiki` before answering."""
    tool_error_rate: float = 0.1
    """Share of calls answered with an error (as the rollout renders them), after which the model still answers."""
    tool_lm_weight: float = 0.1
    """Language-modelling weight of a tool example's prompt and tool result. At lm_weight (1.0), the 200 tokens of
    made-up numbers and dates drowned the answer's few: the answer after a page did not depend on the page at all
    (0.37-0.44 for every number); at 0.1 it follows `page_belief` (0.17-0.83)."""
    page_spread: float = 0.1
    """After a page, the answer is `page_belief` of the page's number +- this."""
    builder_version: int = 5


def _random_answer(rng: random.Random) -> str:
    return f"<answer>{rng.randint(1, 99) / 100:.2f}</answer>"


def _reasoning(rng: random.Random, question: str) -> str:
    words = question.replace("?", " ?").replace(".", " .").split()
    filler = [rng.choice(words + _FILLER) for _ in range(rng.randint(55, 75))]
    return "Let me think. " + " ".join(filler) + ". So the answer is "


def _belief(question: str, spec: TinyModelSpec, numbers: list[int] | None = None, template: str | None = None
            ) -> float:
    # Keyed by the text: families share questions (a 6-sided die is in `dice` and `dice_sizes`), and one question
    # must get one opinion. A tool result gives its own numbers and template.
    if spec.belief_from == "question":
        return random.Random(f"{spec.seed}/{question}").uniform(0.05, 0.95)
    numbers = [int(x) for x in re.findall(r"\d+", question)] if numbers is None else numbers
    template = re.sub(r"\d+", "#", question) if template is None else template
    coef = random.Random(f"{spec.seed}/{template}")
    z = coef.gauss(0, 1) + sum(coef.gauss(0, 1) * x / 10 for x in numbers)
    z += random.Random(f"{spec.seed}/{question}").uniform(-1, 1)
    return 0.05 + 0.9 / (1 + math.exp(-z))


def page_belief(wins: int, spec: TinyModelSpec) -> float:
    """The opinion the warm start gives a page saying `wins` of 10 faces win: a random smooth function of the number
    (a sinusoid with a random phase), so the answer depends strongly on what the page says, as it does in an LLM
    that read it, but not monotonically: unrelated to the probability it implies (`tests/test_tiny_model_beliefs.py`
    checks). With beliefs that barely varied with the number, the answer was the same for every page and GRPO
    learned the base rate, not the page."""
    phase = random.Random(f"{spec.seed}/tool_world/page").uniform(0, 2 * math.pi)
    return 0.5 + 0.35 * math.sin(1.1 * wins + phase)


def _belief_answer(rng: random.Random, question: str, spec: TinyModelSpec, **page) -> str:
    belief = _belief(question, spec, **page)
    q = min(0.99, max(0.01, belief + rng.uniform(-spec.belief_spread, spec.belief_spread)))
    return f"<answer>{q:.2f}</answer>"


# A warm-start example is a list of (token ids, loss weight) segments, laid out exactly as a rollout lays them out.
TOOL_ERRORS = ("error (unavailable): the tool service did not answer (ConnectError)",
               "error (missing): no page titled '{title}'",
               "error (not_yet): '{title}' had no revision by the end of {day}")
Example = list[tuple[list[int], float]]


class _Examples:
    def __init__(self, tokenizer, spec: TinyModelSpec):
        from rollout.chat_format import ChatFormat

        self.tok, self.spec = tokenizer, spec
        self.fmt = ChatFormat(tokenizer, ["wiki"])
        self.pool = [q for q in synthetic.questions(list(synthetic.FAMILIES), "train")
                     if synthetic.family_of(q) != "tool_world"]

    @functools.lru_cache(maxsize=8192)
    def _prompt(self, q, reasoning: bool) -> tuple[int, ...]:
        return tuple(self.fmt.prompt_ids(prompts.user_message(q, reasoning), q.as_of, tools=False))

    def _turn(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids + [self.tok.eos_token_id]

    def _answer(self, rng: random.Random, q, **page) -> str:
        return _random_answer(rng) if self.spec.belief_spread is None else _belief_answer(rng, q.text, self.spec,
                                                                                          **page)

    def batch(self, rng: random.Random, tools_only: bool = False) -> list[Example]:
        """One batch, all direct answers, all reasoning-first or all on the tool world (so short examples are not
        padded to long ones)."""
        lm = self.spec.lm_weight
        if tools_only or rng.random() < self.spec.tool_fraction:
            return [self._tool_example(rng) for _ in range(self.spec.tool_batch)]
        reasoning = rng.random() < self.spec.reasoning_fraction
        out = []
        for _ in range(self.spec.sft_batch):
            q = rng.choice(self.pool)
            target = (_reasoning(rng, q.text) if reasoning else "") + self._answer(rng, q)
            out.append([(list(self._prompt(q, reasoning)), lm), (self._turn(target), 1.0)])
        return out

    def _tool_example(self, rng: random.Random, call_tool: bool | None = None) -> Example:
        """A made-up player. With the tools: call `wiki` for its page, then answer (or answer at once); without the
        tools: answer."""
        lm = self.spec.tool_lm_weight
        player, day = tool_world.made_up_player(rng)
        q = Question(id=f"made_up/{player.name}", text=tool_world.question_text(player.name), as_of=day)
        tools = call_tool or (call_tool is None and rng.random() < self.spec.tool_prompt_rate)
        prompt = [(self.fmt.prompt_ids(prompts.user_message(q, False, tools), q.as_of, tools=tools), lm)]
        if not tools or (call_tool is None and rng.random() >= self.spec.tool_call_rate):
            return prompt + [(self._turn(self._answer(rng, q)), 1.0)]
        rule = player.rule_on(day)
        call = json.dumps({"name": "wiki", "arguments": {"title": player.name}})
        if rng.random() < self.spec.tool_error_rate:  # the call can fail: answer anyway
            page = rng.choice(TOOL_ERRORS).format(title=player.name, day=day)
            answer = self._answer(rng, q)
        else:
            body = {"title": player.name, "timestamp": f"{rule.since.isoformat()}T09:00:00Z",
                    "text": plain_text(tool_world.page_wikitext(player, rule))}
            page, _ = tool_calls.render("wiki", body, day)
            q_page = page_belief(rule.wins, self.spec) + rng.uniform(-self.spec.page_spread, self.spec.page_spread)
            answer = f"<answer>{min(0.99, max(0.01, q_page)):.2f}</answer>"
        return prompt + [(self._turn(f"<tool_call>\n{call}\n</tool_call>"), 1.0), (self.fmt.suffix_ids([page]), lm),
                         (self._turn(answer), 1.0)]

    def corpus(self, n: int = 3000) -> list[str]:
        """Whole tool conversations as text: the tokenizer learns their pieces."""
        rng = random.Random(self.spec.seed)
        return [self.tok.decode([i for seg, _ in self._tool_example(rng, call_tool=True) for i in seg])
                for _ in range(n)]


def build_tokenizer(spec: TinyModelSpec, conversations: list[str] = ()):
    """Byte-level BPE on the questions, numbers and filler text, and on `conversations` (tool-world conversations
    rendered by a first pass of this function: `_Examples.corpus`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(spec.seed)
    corpus = list(conversations)
    # not the tool world's own questions: the made-up ones in `conversations` stand for them
    for q in synthetic.questions([f for f in synthetic.FAMILIES if f != "tool_world"], "all"):
        for reasoning in (False, True):
            corpus.append(f"user\n{prompts.user_message(q, reasoning)}\nassistant\n{_random_answer(rng)}")
    corpus += [f"{i / 100:.2f} {i}/{j}" for i in range(101) for j in range(1, 21)]
    corpus += [" ".join(rng.choice(_FILLER) for _ in range(rng.randint(5, 15))) + "." for _ in range(20000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 chat_template=CHAT_TEMPLATE, model_max_length=4096)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    hf.add_tokens(ADDED)
    return hf


def build_model(spec: TinyModelSpec, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(spec.seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=64, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    return Qwen2ForCausalLM(cfg).float()


def _batch(tokenizer, examples: list[Example]):
    ids = [[i for seg, _ in ex for i in seg] for ex in examples]
    weights = [[w for seg, w in ex for _ in seg] for ex in examples]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    w = torch.tensor([x + [0.0] * (width - len(x)) for x in weights])
    attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, attn, w


def warm_start(model, tokenizer, spec: TinyModelSpec, log=print) -> float:
    rng = random.Random(spec.seed + 1)
    examples = _Examples(tokenizer, spec)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    warm, total = max(1, spec.sft_steps // 10), spec.sft_steps + spec.copy_steps

    def lr(s: int) -> float:  # warm-up and cosine decay, then the copy phase's constant rate
        if s >= spec.sft_steps:
            return spec.copy_lr / spec.sft_lr
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.sft_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(total):
        input_ids, attn, w = _batch(tokenizer, examples.batch(rng, tools_only=step >= spec.sft_steps))
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        weight = w[:, 1:]
        loss = (nll * weight).sum() / weight.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == total - 1:
            log(f"warm start step {step}/{total} loss {loss.item():.4f}")
    model.eval()
    return float(loss.item())


def build(out_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec(), log=print) -> Path:
    """Build into a temporary folder and move it into place, so a half-built model is never picked up."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    t0 = time.time()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tokenizer = build_tokenizer(spec, _Examples(build_tokenizer(spec), spec).corpus())
    model = build_model(spec, tokenizer)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"tiny model: vocab {len(tokenizer)}, {nparams:,} parameters")
    final_loss = warm_start(model, tokenizer, spec, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tokenizer.save_pretrained(tmp)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp, safe_serialization=True)
    info = {"spec": spec.model_dump(), "params": nparams, "final_loss": final_loss,
            "seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    (tmp / "build_info.json").write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"tiny model saved to {out} in {time.time() - t0:.0f}s")
    return out


def ensure(out_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec(), log=print) -> Path:
    """Reuse the model at out_dir if it was built from the same spec; build it otherwise."""
    out = Path(out_dir)
    info = out / "build_info.json"
    if info.is_file():
        try:
            if json.loads(info.read_text())["spec"] == spec.model_dump():
                return out
        except (ValueError, KeyError):
            pass
        log(f"{out} was built from another spec; rebuilding")
    return build(out, spec, log)
