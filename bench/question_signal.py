"""What can a forecaster that knows nothing of the world learn from the training questions that carries to the
held-out ones? The real-questions recipe asks GRPO to beat the best constant on later questions; this measures how far
anything fitted to the same training markets gets, without a GPU and in minutes, so a GRPO result can be read
against it.

    python bench/question_signal.py [--config cluster/configs/smollm2-forecastbench-cpu.yaml] [--set k=v ...]
                                    [--model models/smollm2-135m] [--within [--write-within DIR]] [--json OUT]

Each forecaster is fitted on the config's training questions (their market probabilities, the reward's target) and
scored on its held-out ones by cross entropy to the market, as `forecast-grpo eval` scores a model:

- best constant: the training markets' mean, the baseline the recipe must beat;
- by source: each source's training mean (manifold, metaculus, ...), shrunk towards the constant by SHRINK questions;
- by source and horizon: the same per source and days from the as-of date to the resolution date, in powers of two;
- words: a logistic regression on the question's hashed words and word pairs, fitted to the training markets (soft
  labels), its L2 weight picked on a random fifth of the training questions;
- the model's prior (`--model DIR`, an imported model folder): the log-odds of Yes against No as the model's first
  token after the question in its chat template, mapped to a probability by a logistic fit on the training markets:
  what the model knows of these questions before any training;
- and, as a reference no learner has, the held-out markets' own mean: what a constant would score knowing the shift.

Each row is the held-out CE and its difference from the best constant with a 95% bootstrap interval over questions,
on all the held-out questions and on the fixed subset the recipe evaluates (`run.eval_max_questions`).
`--within` fits the same on a random four fifths of the training questions and scores the rest: whether the features
carry any signal when no time passes between the two sides. `--write-within DIR` writes that split as
DIR/train.parquet and DIR/eval.parquet, for a GRPO run on it (`--set task.data=DIR/train.parquet --set
task.eval_data=DIR/eval.parquet`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages

from cluster.config import load_config  # noqa: E402
from rollout import evaluate  # noqa: E402
from rollout.questions import Question, write_parquet  # noqa: E402
from rollout.task import load_pool  # noqa: E402

SHRINK = 10
"""Pseudo-questions at the best constant added to each group's mean: a group of 3 questions says little."""
FEATURES = 2 ** 14
"""Hashed word and word-pair features."""
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def markets(qs: list[Question]) -> np.ndarray:
    return np.array([q.market_prob for q in qs], dtype=np.float64)


def group_means(train: list[Question], key) -> callable:
    """A forecaster from each group's shrunk mean market (the best constant for a group never seen)."""
    const = markets(train).mean()
    groups = defaultdict(list)
    for q in train:
        groups[key(q)].append(q.market_prob)
    means = {k: (sum(v) + SHRINK * const) / (len(v) + SHRINK) for k, v in groups.items()}
    return lambda qs: np.array([means.get(key(q), const) for q in qs])


def horizon(q: Question) -> str:
    """Days from the as-of date to the resolution date, in powers of two ("none" where either date is missing)."""
    if q.as_of is None or q.resolution_date is None:
        return "none"
    return str(int(math.log2(max((q.resolution_date - q.as_of).days, 0) + 1)))


def word_features(qs: list[Question]) -> torch.Tensor:
    x = torch.zeros(len(qs), FEATURES)
    for i, q in enumerate(qs):
        words = re.findall(r"[a-z0-9]+", q.text.lower())
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        x[i, [zlib.crc32(g.encode()) % FEATURES for g in grams]] = 1.0
    return x


def fit_logistic(x: torch.Tensor, target: np.ndarray, l2: float) -> callable:
    """p = sigmoid(x.w + b) minimising the cross entropy to the soft targets plus l2 |w|^2 (L-BFGS, at most 500
    iterations)."""
    y = torch.tensor(target, dtype=torch.float32)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.tensor(math.log(y.mean() / (1 - y.mean())), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        out = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        out.backward()
        return out

    opt.step(loss)
    w, b = w.detach(), b.detach()
    return lambda xe: torch.sigmoid(xe @ w + b).numpy().astype(np.float64)


def ce(qs: list[Question], p: np.ndarray) -> np.ndarray:
    return evaluate.question_scores(qs, p)["ce"]


def words_forecaster(train: list[Question], seed: int) -> tuple[callable, float]:
    """The word model, its L2 weight picked on a random fifth of the training questions, then refitted on all."""
    x, y = word_features(train), markets(train)
    dev = np.random.default_rng(seed).random(len(train)) < 0.2
    fit_idx, dev_idx = torch.tensor(np.flatnonzero(~dev)), torch.tensor(np.flatnonzero(dev))
    dev_qs = [train[i] for i in dev_idx]
    scores = {l2: np.nanmean(ce(dev_qs, fit_logistic(x[fit_idx], y[~dev], l2)(x[dev_idx]))) for l2 in L2_GRID}
    l2 = min(scores, key=scores.get)
    model = fit_logistic(x, y, l2)
    return lambda qs: model(word_features(qs)), l2


def yes_no_logodds(model_dir: str, qs: list[Question]) -> np.ndarray:
    """The model's log-odds of answering Yes rather than No, first token after the question in its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = {w: sorted({tok.encode(s, add_special_tokens=False)[0] for s in (w, " " + w)}) for w in ("Yes", "No")}
    if set(ids["Yes"]) & set(ids["No"]):
        raise ValueError(f"{model_dir}: its tokenizer starts Yes and No with the same token; no prior to read")
    out = np.empty(len(qs))
    for i, q in enumerate(qs):
        when = f"Today is {q.as_of}. " if q.as_of else ""
        chat = [{"role": "user", "content": f"{when}Answer Yes or No. {q.text}"}]
        prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        with torch.no_grad():
            logits = model(**tok(prompt, return_tensors="pt", add_special_tokens=False)).logits[0, -1]
        lp = logits.log_softmax(-1)
        out[i] = float(torch.logsumexp(lp[ids["Yes"]], 0) - torch.logsumexp(lp[ids["No"]], 0))
        if (i + 1) % 200 == 0 or i + 1 == len(qs):
            print(f"  model prior: {i + 1}/{len(qs)} questions", file=sys.stderr, flush=True)
    return out


def prior_forecaster(logodds: dict[str, float], train: list[Question]) -> tuple[callable, dict]:
    """The model's Yes/No log-odds (by question id), calibrated by p = sigmoid(a * logodds + b) fitted on the
    training markets."""
    def x(qs):
        return torch.tensor([logodds[q.id] for q in qs], dtype=torch.float32)[:, None]

    model = fit_logistic(x(train), markets(train), 0.0)
    corr = float(np.corrcoef(x(train)[:, 0].numpy(), markets(train))[0, 1])
    return lambda qs: model(x(qs)), {"corr_train": corr}


def compare(train: list[Question], heldout: list[Question], subset: list[int] | None,
            prior: dict[str, float] | None, seed: int) -> dict:
    """Every forecaster fitted on `train` and scored on `heldout` (and on its `subset`, indices) against the best
    constant: {name: {"ce", "minus_constant", "subset_ce", "subset_minus_constant", ...}}."""
    const = float(markets(train).mean())
    fitted = {"best constant": (lambda qs: np.full(len(qs), const), {"p": const}),
              "by source": (group_means(train, lambda q: q.source), {}),
              "by source and horizon": (group_means(train, lambda q: (q.source, horizon(q))), {})}
    words, l2 = words_forecaster(train, seed)
    fitted["words"] = (words, {"l2": l2})
    if prior:
        fitted["model prior"] = prior_forecaster(prior, train)
    fitted["held-out mean (not learnable)"] = (lambda qs: np.full(len(qs), markets(heldout).mean()),
                                               {"p": float(markets(heldout).mean())})
    base = ce(heldout, np.full(len(heldout), const))
    rows = {}
    for name, (forecast, extra) in fitted.items():
        per = ce(heldout, forecast(heldout))
        row = {"ce": float(np.nanmean(per)), "minus_constant": evaluate.mean_interval(per - base, seed=seed),
               "n": int((~np.isnan(per)).sum()), **extra}
        if subset:
            row["subset_ce"] = float(np.nanmean(per[subset]))
            row["subset_minus_constant"] = evaluate.mean_interval(per[subset] - base[subset], seed=seed)
        if name == "model prior":
            row["corr_heldout"] = float(np.corrcoef([prior[q.id] for q in heldout], markets(heldout))[0, 1])
        rows[name] = row
    return rows


def table(title: str, rows: dict, train: int, heldout: int, subset: int | None) -> str:
    head = f"| {title} | CE to market | minus best constant ({heldout} questions) |"
    rule = "| --- | --- | --- |"
    if subset:
        head += f" on the recipe's {subset} |"
        rule += " --- |"
    lines = [f"fitted on {train} training questions", head, rule]
    for name, r in rows.items():
        line = f"| {name} | {r['ce']:.4f} | {evaluate.interval_text(r['minus_constant'])} |"
        if subset:
            line += f" {evaluate.interval_text(r['subset_minus_constant'])} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "cluster/configs/smollm2-forecastbench-cpu.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--model", help="an imported model folder: add its Yes/No prior as a forecaster")
    ap.add_argument("--within", action="store_true", help="also a random split of the training questions")
    ap.add_argument("--write-within", metavar="DIR", help="with --within: write that split's two sides here")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)
    if args.write_within and not args.within:
        ap.error("--write-within writes the --within split: give --within too")

    cfg = load_config(args.config, args.set)
    if cfg.task.source != "parquet" or cfg.task.reward != "market":
        sys.exit(f"{args.config}: needs real questions scored against the market (task.source: parquet, "
                 "task.reward: market)")
    train, heldout = load_pool(cfg.task), load_pool(cfg.task, "heldout")
    if not heldout:
        sys.exit(f"{args.config}: no held-out questions (task.eval_data, or task.train_before)")
    print(f"{len(train)} training markets (mean {markets(train).mean():.3f}), {len(heldout)} held out "
          f"(mean {markets(heldout).mean():.3f})", flush=True)
    cap, seed = cfg.run.eval_max_questions, cfg.run.seed
    # the questions the recipe's evaluations ask (None: all of them, nothing to report apart)
    subset = evaluate.fixed_subset(len(heldout), cap, seed) if cap and len(heldout) > cap else None
    prior = None
    if args.model:  # read once, for every split below
        both = train + heldout
        prior = dict(zip([q.id for q in both], yes_no_logodds(args.model, both)))
    out = {"heldout": compare(train, heldout, subset, prior, seed)}
    print(table("held out (later questions)", out["heldout"], len(train), len(heldout), len(subset or [])))
    if prior:
        r = out["heldout"]["model prior"]
        print(f"the model's Yes/No log-odds against the market: correlation {r['corr_train']:+.3f} on the training "
              f"questions, {r['corr_heldout']:+.3f} on the held-out ones")
    if args.within:
        pick = np.random.default_rng(seed).permutation(len(train))
        cut = len(train) * 4 // 5
        fit, rest = [train[i] for i in pick[:cut]], [train[i] for i in pick[cut:]]
        out["within"] = compare(fit, rest, None, prior, seed)
        if args.write_within:
            Path(args.write_within).mkdir(parents=True, exist_ok=True)
            write_parquet(fit, Path(args.write_within) / "train.parquet")
            write_parquet(rest, Path(args.write_within) / "eval.parquet")
        print(table("within the training period (random fifth)", out["within"], len(fit), len(rest), None))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
