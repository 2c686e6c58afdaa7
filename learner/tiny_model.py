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

from rollout import prompts, synthetic

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's tool-call markers are ordinary added tokens there, too.
ADDED = ["<tool_call>", "</tool_call>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
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
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    sft_steps: int = 400
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
    builder_version: int = 4


def _random_answer(rng: random.Random) -> str:
    return f"<answer>{rng.randint(1, 99) / 100:.2f}</answer>"


def _reasoning(rng: random.Random, question: str) -> str:
    words = question.replace("?", " ?").replace(".", " .").split()
    filler = [rng.choice(words + _FILLER) for _ in range(rng.randint(55, 75))]
    return "Let me think. " + " ".join(filler) + ". So the answer is "


def _belief(question: str, spec: TinyModelSpec) -> float:
    # Keyed by the text: families share questions (a 6-sided die is in `dice` and `dice_sizes`), and one question
    # must get one opinion.
    if spec.belief_from == "question":
        return random.Random(f"{spec.seed}/{question}").uniform(0.05, 0.95)
    numbers = [int(x) for x in re.findall(r"\d+", question)]
    template = re.sub(r"\d+", "#", question)
    coef = random.Random(f"{spec.seed}/{template}")
    z = coef.gauss(0, 1) + sum(coef.gauss(0, 1) * x / 10 for x in numbers)
    z += random.Random(f"{spec.seed}/{question}").uniform(-1, 1)
    return 0.05 + 0.9 / (1 + math.exp(-z))


def _belief_answer(rng: random.Random, question: str, spec: TinyModelSpec) -> str:
    belief = _belief(question, spec)
    q = min(0.99, max(0.01, belief + rng.uniform(-spec.belief_spread, spec.belief_spread)))
    return f"<answer>{q:.2f}</answer>"


def _warm_start_batch(rng: random.Random, spec: TinyModelSpec, pool) -> list[tuple[str, str]]:
    """One batch, all direct answers or all reasoning-first (so short batches are not padded to long ones)."""
    reasoning = rng.random() < spec.reasoning_fraction
    out = []
    for _ in range(spec.sft_batch):
        q = rng.choice(pool)
        answer = _random_answer(rng) if spec.belief_spread is None else _belief_answer(rng, q.text, spec)
        out.append((prompts.user_message(q, reasoning), (_reasoning(rng, q.text) if reasoning else "") + answer))
    return out


def build_tokenizer(spec: TinyModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(spec.seed)
    corpus = []
    for q in synthetic.questions(list(synthetic.FAMILIES), "all"):
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


@functools.lru_cache(maxsize=4096)
def _prompt_ids(tokenizer, user: str) -> tuple[int, ...]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


def _batch(tokenizer, examples, lm_weight: float):
    ids, weights = [], []
    for user, target in examples:
        p = list(_prompt_ids(tokenizer, user))
        c = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids.append(p + c)
        weights.append([lm_weight] * len(p) + [1.0] * len(c))
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    w = torch.tensor([x + [0.0] * (width - len(x)) for x in weights])
    attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, attn, w


def warm_start(model, tokenizer, spec: TinyModelSpec, log=print) -> float:
    rng = random.Random(spec.seed + 1)
    pool = synthetic.questions(list(synthetic.FAMILIES), "train")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    warm = max(1, spec.sft_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.sft_steps))))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(spec.sft_steps):
        input_ids, attn, w = _batch(tokenizer, _warm_start_batch(rng, spec, pool), spec.lm_weight)
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        weight = w[:, 1:]
        loss = (nll * weight).sum() / weight.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == spec.sft_steps - 1:
            log(f"warm start step {step}/{spec.sft_steps} loss {loss.item():.4f}")
    model.eval()
    return float(loss.item())


def build(out_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec(), log=print) -> Path:
    """Build into a temporary folder and move it into place, so a half-built model is never picked up."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    t0 = time.time()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tokenizer = build_tokenizer(spec)
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
