"""Synthetic forecasting questions with a known aleatoric probability p*.

They simulate the dynamics of training on real events: the answer is a probability, the best any forecaster can do
is p* itself, and its expected log score -H(p*) is the entropy floor. Each family has training parameters and
held-out parameters (for instance die sizes never trained on) for evaluation.

The dice family's text is identical to the TRL peer harness's task (`../shared/peers/trl/task.py`), so the two
systems can be compared on the same prompts.
"""

from __future__ import annotations

from fractions import Fraction
from itertools import product

from rollout import tool_world
from rollout.questions import Question

# A family maps a split to (id, text, p*) triples, or (id, text, p*, as-of date) for questions asked as of a date.
_WORDS = {2: "twice", 3: "three times", 4: "four times", 5: "five times", 6: "six times", 7: "seven times"}


def _dice(sides: tuple[int, ...], family: str = "dice"):
    for n in sides:
        for k in range(2, n + 1):
            yield (f"{family}/{n}/ge{k}", f"A fair {n}-sided die is rolled. What is the probability the result is at "
                   f"least {k}?", Fraction(n - k + 1, n))
        for k in range(1, n):
            yield (f"{family}/{n}/le{k}", f"A fair {n}-sided die is rolled. What is the probability the result is at "
                   f"most {k}?", Fraction(k, n))


def _two_dice(sides: tuple[int, ...]):
    for n in sides:
        sums = [a + b for a, b in product(range(1, n + 1), repeat=2)]
        for s in range(3, 2 * n + 1):
            p = Fraction(sum(x >= s for x in sums), n * n)
            yield (f"two_dice/{n}/ge{s}", f"Two fair {n}-sided dice are rolled. What is the probability their sum "
                   f"is at least {s}?", p)


def _urn(totals: tuple[int, ...]):
    for total in totals:
        for red in range(1, total):
            yield (f"urn/{total}/r{red}", f"An urn holds {red} red and {total - red} blue balls. One ball is drawn "
                   f"at random. What is the probability it is red?", Fraction(red, total))


def _coin(ratios: tuple[int, ...]):
    for r in ratios:
        w = _WORDS[r]
        yield (f"coin/{r}/heads", f"A coin is weighted so that heads comes up {w} as often as tails. What is the "
               f"probability the next flip is heads?", Fraction(r, r + 1))
        yield (f"coin/{r}/tails", f"A coin is weighted so that tails comes up {w} as often as heads. What is the "
               f"probability the next flip is heads?", Fraction(1, r + 1))


def _calc(sides: tuple[int, ...]):
    # Needs a short calculation: 1 - ((n-1)/n)^m.
    for n in sides:
        for m in range(1, 5):
            yield (f"calc/{n}/any{m}", f"A fair {n}-sided die is rolled {m} times. What is the probability that at "
                   f"least one roll shows {n}?", 1 - Fraction(n - 1, n) ** m)


# `dice` trains on one size (the TRL harness's task), so nothing in it teaches what the size means; `dice_sizes`
# trains on the common polyhedral dice and holds out the sizes between them.
FAMILIES = {
    "dice": (lambda: _dice((6,)), lambda: _dice((4, 8, 10, 12))),
    "dice_sizes": (lambda: _dice((4, 6, 8, 10, 12, 20), "dice_sizes"), lambda: _dice((5, 7, 9, 11), "dice_sizes")),
    "two_dice": (lambda: _two_dice((6,)), lambda: _two_dice((4,))),
    "urn": (lambda: _urn((4, 5, 6, 8, 10)), lambda: _urn((7, 9))),
    "coin": (lambda: _coin((2, 3, 4, 6)), lambda: _coin((5, 7))),
    "calc": (lambda: _calc((6,)), lambda: _calc((4, 8))),
    # facts that change over dated revisions, knowable only through the tools (rollout/tool_world.py)
    "tool_world": (lambda: tool_world.family("train"), lambda: tool_world.family("heldout")),
}


def questions(families: list[str], split: str = "train") -> list[Question]:
    """Every question of the given families and split ('train', 'heldout' or 'all')."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown synthetic families {unknown}; known: {sorted(FAMILIES)}")
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, not {split!r}")
    # Held out means never trained on: a held-out question of one family may be a training question of another
    # (dice's 4-sided die is one of dice_sizes' training sizes), and it is dropped when both are chosen.
    trained = {row[1] for fam in families for row in FAMILIES[fam][0]()} if split == "heldout" else set()
    out = []
    for fam in families:
        makers = FAMILIES[fam] if split == "all" else (FAMILIES[fam][split == "heldout"],)
        for make in makers:
            for qid, text, p, *as_of in make():
                assert 0 < p < 1, qid
                if text not in trained:
                    out.append(Question(id=qid, text=text, source=f"synthetic/{fam}", market_prob=float(p),
                                        p_true=float(p), as_of=as_of[0] if as_of else None))
    return out


def family_of(q: Question) -> str:
    return q.source.split("/", 1)[1] if q.source.startswith("synthetic/") else q.source
