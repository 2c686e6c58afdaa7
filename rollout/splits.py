"""Time-based train / eval splits that cannot leak a question from one side to the other.

Train on questions asked (as-of date) before the cutoff, evaluate on those asked on or after it: the same rule as
`task.train_before`. Two guards against leakage:

- A question on the eval side that shares its id or its normalised text (lowercase, punctuation removed, whitespace
  collapsed) with a training question is dropped from eval: the same question is often re-asked at a later date.
- A training question resolved on or after the cutoff has its outcome hidden: on the cutoff date it was not known,
  and training on it would teach the model about the evaluation period. Its market probability, known at its as-of
  date, stays.

Questions without an as-of date cannot be placed and go to neither side. Everything removed or hidden is counted.

`held_out` applies the first guard to any held-out set (`task.eval_data`, files of later questions): a question it
shares with training, by id or by text, is dropped from it, and so is an id it holds twice.
"""

from __future__ import annotations

import datetime as dt
import re
import string
from collections import Counter
from dataclasses import dataclass, field

from rollout.questions import Question

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_text(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


@dataclass
class Split:
    train: list[Question]
    eval: list[Question]
    removed: Counter = field(default_factory=Counter)
    """Questions left out of a side (or out of both), per reason; also outcomes hidden on the training side."""

    def lines(self) -> list[str]:
        out = [f"train {len(self.train)} questions, eval {len(self.eval)}"]
        out += [f"  {n:6d}  {r}" for r, n in self.removed.most_common()]
        return out


def time_split(questions: list[Question], cutoff: dt.date, hide_late_outcomes: bool = True) -> Split:
    train, later, removed = [], [], Counter()
    for q in questions:
        if q.as_of is None:
            removed["no as-of date: in neither split"] += 1
        elif q.as_of < cutoff:
            if (hide_late_outcomes and q.outcome is not None and q.resolution_date is not None
                    and q.resolution_date >= cutoff):
                q = q.model_copy(update={"outcome": None})
                removed["train: outcome hidden, resolved on or after the cutoff"] += 1
            train.append(q)
        else:
            later.append(q)
    return held_out(train, later, removed)


def held_out(train: list[Question], candidates: list[Question], removed: Counter | None = None) -> Split:
    """The candidates that share no question with `train` (by id or normalised text), each id once (the first)."""
    removed = Counter() if removed is None else removed
    ids = {q.id for q in train}
    texts = {normalise_text(q.text) for q in train}
    evals, seen = [], set()
    for q in candidates:
        if q.id in ids:
            removed["eval: dropped, same id as a training question"] += 1
        elif normalise_text(q.text) in texts:
            removed["eval: dropped, same text as a training question"] += 1
        elif q.id in seen:
            removed["eval: dropped, an id already in the held-out set"] += 1
        else:
            seen.add(q.id)
            evals.append(q)
    return Split(train, evals, removed)
