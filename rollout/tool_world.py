"""A synthetic world whose facts change over dated revisions: the built-in task where tools matter.

Each player rolls a ten-faced die, some of whose faces win; how many changes on given dates. A wiki page per
player (its title: the player's name, `Player 137`) says what holds since its latest revision, and a dated news
item announces each change. A question asks, as of a date, for the probability that
the player's next roll wins: p* = winning faces / faces under the rule in force on that date. Reading the page is
the whole skill (the dice families are where GRPO learns to compute): a forecaster with the tools can know p*,
one without them only the base rate, and a leak shows up as a wrong answer.

- The question text is the same for every date and does not carry the fact: without tools a forecaster can know
  only the base rate (and, for players it trained on, what it has memorised about them).
- Every later revision and later news item holds another rule, so a leak shows up as a measurable error, not only
  as a counter.
- Held-out players are never trained on (nor in the tiny model's warm start).
- The world is served through the real tool path: `write_snapshot` fills a real revision cache (`tools.cache`) and
  exports it as the snapshot the service loads, `write_news` writes a real news corpus (`tools.news`).

Everything is drawn from one seeded generator, so the world, its questions and its files are the same every time.
"""

from __future__ import annotations

import datetime as dt
import functools
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

START = dt.date(2024, 1, 1)
END = dt.date(2025, 12, 31)
FACES = 10
PLAYERS = {"train": 64, "heldout": 16}
NUMBERS = range(100, 1000)
"""Players are numbered: the world's are 80 of these numbers (a seeded draw), the tiny model's warm start makes up
players with the others. Numbers, not names: a call copies the player's number from the question, which a two-layer
model learns as a copy of the tokens at a fixed distance back, for any number (with every digit seen in every
place: made up from 200 to 999 only, it never wrote a leading 1). It never learned to copy syllable names (0.0002 of
its probability on the right title; the same made-up name for every player)."""
QUESTIONS_PER_PLAYER = 10


@dataclass(frozen=True)
class Rule:
    since: dt.date
    faces: int
    wins: int

    @property
    def p(self) -> Fraction:
        return Fraction(self.wins, self.faces)

    def sentence(self) -> str:
        return f"rolls a die with {self.faces} faces, {self.wins} of which win"


@dataclass(frozen=True)
class Player:
    name: str
    rules: tuple[Rule, ...]
    """In date order; the first is the page's creation."""

    def rule_on(self, day: dt.date) -> Rule | None:
        """The rule in force as of `day` (end of that day), None before the page existed."""
        current = None
        for r in self.rules:
            if r.since <= day:
                current = r
        return current


def _rule(rng: random.Random, since: dt.date, before: Rule | None) -> Rule:
    while True:  # a change changes the probability: a leaked later rule is always a wrong answer
        r = Rule(since, FACES, rng.randint(1, FACES - 1))
        if before is None or r.p != before.p:
            return r


@functools.lru_cache(maxsize=4)
def players(seed: int = 0) -> dict[str, tuple[Player, ...]]:
    """Training and held-out players, each with 3 to 5 rules between START and END."""
    rng = random.Random(f"tool-world/{seed}")
    numbers = iter(world_numbers(seed))
    out = {}
    for split, count in PLAYERS.items():
        group = []
        for _ in range(count):
            name = f"Player {next(numbers)}"
            days = sorted(rng.sample(range(1, (END - START).days - 30), rng.randint(2, 4)))
            created = START + dt.timedelta(days=rng.randint(0, 60))
            dates = [created] + [START + dt.timedelta(days=d) for d in days if START + dt.timedelta(days=d) > created]
            rules: list[Rule] = []
            for d in dates:
                rules.append(_rule(rng, d, rules[-1] if rules else None))
            group.append(Player(name, tuple(rules)))
        out[split] = tuple(group)
    return out


@functools.lru_cache(maxsize=4)
def world_numbers(seed: int = 0) -> tuple[int, ...]:
    return tuple(random.Random(f"tool-world/{seed}/numbers").sample(NUMBERS, sum(PLAYERS.values())))


def made_up_player(rng: random.Random, seed: int = 0) -> tuple[Player, dt.date]:
    """A player that is not in the world, with one rule, and a day to ask about it: the tiny model's warm start
    learns the tool-call format on these, never on the world's own players."""
    taken = set(world_numbers(seed))
    number = rng.choice([n for n in NUMBERS if n not in taken])
    name = f"Player {number}"
    since = START + dt.timedelta(days=rng.randint(0, (END - START).days - 1))
    day = since + dt.timedelta(days=rng.randint(0, (END - since).days))
    return Player(name, (_rule(rng, since, None),)), day


def question_text(name: str) -> str:
    return f"What is the probability that {name} wins the next roll of the die?"


def question_dates(player: Player, seed: int = 0) -> list[dt.date]:
    rng = random.Random(f"tool-world/{seed}/{player.name}/dates")
    first = player.rules[0].since
    span = (END - first).days
    return sorted(first + dt.timedelta(days=d) for d in rng.sample(range(span + 1), QUESTIONS_PER_PLAYER))


def family(split: str, seed: int = 0):
    """(id, text, p*, as_of) for every question of the split, as `rollout.synthetic` families yield them."""
    for player in players(seed)[split]:
        for day in question_dates(player, seed):
            yield (f"tool_world/{player.name.replace(' ', '_')}/{day.isoformat()}", question_text(player.name),
                   player.rule_on(day).p, day)


# ------------------------------------------------------------------ the world's pages and news, as tools serve them

REVID_BASE = 100_000


def page_wikitext(player: Player, rule: Rule) -> str:
    return f"'''{player.name}''' {rule.sentence()}.<ref>Announced on {rule.since.isoformat()}.</ref>"


def revisions(seed: int = 0):
    """(title, revid, timestamp, wikitext) of every revision of every page, players of both splits."""
    revid = REVID_BASE
    for split in PLAYERS:
        for player in players(seed)[split]:
            for rule in player.rules:
                revid += 1
                yield player.name, revid, f"{rule.since.isoformat()}T09:00:00Z", page_wikitext(player, rule)


def news_items(seed: int = 0) -> list[dict]:
    """One dated item per rule: what a news search can find (only within its window before the as-of date)."""
    out = []
    for split in PLAYERS:
        for player in players(seed)[split]:
            for i, rule in enumerate(player.rules):
                verb = "starts playing" if i == 0 else "changes the rules"
                out.append({"date": rule.since, "title": f"{player.name} {verb}",
                            "summary": f"From today {player.name} {rule.sentence()}.",
                            "source": "Tool World Gazette",
                            "url": f"https://gazette.example/{player.name.lower().replace(' ', '-')}/"
                                   f"{rule.since.isoformat()}"})
    return out


def write_snapshot(path: str | Path, seed: int = 0) -> Path:
    """The world's wiki as a revision-cache snapshot: every revision, every page's creation, and what each page
    showed as of every day from its creation to END (what an offline service answers from)."""
    import tempfile

    from tools.cache import WikiCache

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache = WikiCache(Path(tmp) / "world.sqlite")
        revid_of: dict[tuple[str, dt.date], int] = {}
        with cache.bulk():
            for title, revid, timestamp, wikitext in revisions(seed):
                cache.put_revision(title, revid, timestamp, wikitext)
                revid_of[title, dt.date.fromisoformat(timestamp[:10])] = revid
            for split in PLAYERS:
                for player in players(seed)[split]:
                    cache.put_page(player.name, f"{player.rules[0].since.isoformat()}T09:00:00Z")
                    for k in range((END - player.rules[0].since).days + 1):
                        day = player.rules[0].since + dt.timedelta(days=k)
                        rule = player.rule_on(day)
                        cache.put_lookup(player.name, day, "ok", revid=revid_of[player.name, rule.since])
        cache.export_snapshot(path)
        cache.close()
    return path


def write_news(path: str | Path, seed: int = 0) -> Path:
    from tools.news import write_corpus

    write_corpus(news_items(seed), path)
    return Path(path)
