"""The synthetic world's entities: made-up names, and who was born, lives, founded what where.

Countries, cities, rivers, people and companies with seeded attributes; nothing here is text
(see :mod:`sr1.data.synth_text` for how the world is written) and nothing is random beyond the
one ``random.Random`` passed in, so a seed fixes the world.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from sr1.errors import Sr1Error

_ONSETS = "b d f g h k l m n p r s t v z br dr kr tr st th sh gr".split()  # noqa: SIM905
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "a", "i", "ai", "ei"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "rn", "nd", "v"]
_KINDS = [  # (name suffix, industry, product)
    ("Industries", "steel", "rolled steel"),
    ("Shipping", "shipping", "cargo ships"),
    ("Press", "publishing", "atlases"),
    ("Records", "music", "folk records"),
    ("Motors", "car", "small trucks"),
    ("Bank", "banking", "savings accounts"),
    ("Foods", "food", "canned fish"),
    ("Textiles", "textile", "wool cloth"),
    ("Labs", "research", "glass lenses"),
    ("Airways", "aviation", "regional flights"),
    ("Mining", "mining", "copper ore"),
    ("Brewery", "brewing", "dark beer"),
]
OCCUPATIONS = [
    *("painter", "engineer", "merchant", "physician", "architect", "poet", "chemist", "banker"),
    *("sculptor", "composer", "lawyer", "botanist", "sailor", "teacher", "astronomer"),
]
_TOPICS = [
    "stone bridges",
    "river maps",
    "glass lenses",
    "folk songs",
    "tax law",
    "mountain orchids",
    "clock towers",
    "sea charts",
    "wool dyes",
    "city parks",
    "steam pumps",
    "bird migration",
]
_LANDMARKS = [
    "its old stone bridge",
    "a painted clock tower",
    "its salt market",
    "a hilltop fortress",
    "its botanical garden",
    "a long harbour wall",
]
_CITY_TRADES = ["fishing", "salt trade", "weaving", "timber", "glassmaking", "farming", "tourism"]
_DIRECTIONS = ["north", "south", "east", "west"]
FIELDS = ["poetry", "engineering", "medicine", "painting", "architecture", "botany"]


@dataclass(frozen=True)
class SynthConfig:
    """Sizes and knobs of the world (every field has a default that runs the demo)."""

    seed: int = 0
    n_entities: int = 300  # people 45%, companies 25%, cities 18%, rivers 9%, countries 3%
    n_train: int | None = 800  # None: every question not in dev or test
    n_dev: int = 100
    n_test: int = 200
    paraphrase_rate: float = 0.5  # share of people/companies/cities with a second passage
    distractor_rate: float = 1.0  # distractor passages per 1 entity (roughly)


class _Names:
    """Made-up words, each used once across the whole world (so names never collide)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int = 2) -> str:
        for _ in range(1000):
            parts = []
            for i in range(syllables):
                coda = (
                    self.rng.choice(_CODAS)
                    if i == syllables - 1 or self.rng.random() < 0.15
                    else ""
                )
                parts.append(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + coda)
            w = "".join(parts).capitalize()
            if 4 <= len(w) <= 8 and w.lower() not in self.used:
                self.used.add(w.lower())
                return w
        raise Sr1Error("ran out of fresh names; lower --n-entities")  # pragma: no cover


@dataclass
class Entity:
    kind: str
    name: str
    attrs: dict[str, Any] = field(default_factory=dict)


def build_world(cfg: SynthConfig, rng: random.Random) -> dict[str, list[Entity]]:
    n = max(cfg.n_entities, 40)
    n_countries = max(2, round(n * 0.03))
    n_rivers = max(3, round(n * 0.09))
    n_cities = max(6, round(n * 0.18))
    n_orgs = max(4, round(n * 0.25))
    n_people = max(n_orgs + 2, n - n_countries - n_rivers - n_cities - n_orgs)
    names = _Names(rng)
    countries = [Entity("country", names.word()) for _ in range(n_countries)]
    rivers = [Entity("river", f"{names.word()} River") for _ in range(n_rivers)]
    cities = [Entity("city", names.word()) for _ in range(n_cities)]
    for i, c in enumerate(cities):
        c.attrs = {
            "country": countries[i % n_countries].name,
            "river": rivers[i % n_rivers].name,
            "population": rng.randrange(12, 900) * 1000 + rng.randrange(0, 10) * 100,
            "neighbour": cities[(i + 1 + rng.randrange(n_cities - 1)) % n_cities].name,
            "direction": rng.choice(_DIRECTIONS),
            "trade": rng.choice(_CITY_TRADES),
            "landmark": rng.choice(_LANDMARKS),
            "rebuilt": rng.randrange(1700, 1900),
        }
    for r in rivers:
        r.attrs = {
            "cities": [c.name for c in cities if c.attrs["river"] == r.name],
            "hills": names.word(),
            "sea": names.word(),
            "km": rng.randrange(80, 900),
        }
        r.attrs["country"] = next(c.attrs["country"] for c in cities if c.name in r.attrs["cities"])
    for i, k in enumerate(countries):
        own = [c.name for c in cities if c.attrs["country"] == k.name]
        k.attrs = {
            "capital": own[0],
            "neighbour": countries[(i + 1) % n_countries].name,
            "language": names.word() + "ic",
            "millions": rng.randrange(2, 60),
        }
    firsts = [names.word() for _ in range(max(8, n_people // 3))]
    lasts = [names.word(rng.choice((2, 2, 2, 3))) for _ in range(max(8, (n_people * 2) // 3))]
    people: list[Entity] = []
    full: set[str] = set()
    while len(people) < n_people:
        nm = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if nm in full:
            continue
        full.add(nm)
        birth, res, studied = rng.sample(cities, 3)
        people.append(
            Entity(
                "person",
                nm,
                {
                    "birth_city": birth.name,
                    "residence": res.name,
                    "studied": studied.name,
                    "birth_year": rng.randrange(1850, 1960),
                    "occupation": rng.choice(OCCUPATIONS),
                    "topic": rng.choice(_TOPICS),
                    "pron": rng.choice((("she", "her", "She"), ("he", "his", "He"))),
                },
            )
        )
    stems = [names.word() for _ in range(max(3, (n_orgs * 2) // 3))]
    founders = rng.sample(people, n_orgs)
    orgs: list[Entity] = []
    org_names: set[str] = set()
    while len(orgs) < n_orgs:
        suffix, industry, product = rng.choice(_KINDS)
        nm = f"{rng.choice(stems)} {suffix}"
        if nm in org_names:
            continue
        org_names.add(nm)
        founder = founders[len(orgs)]
        hq, off1, off2 = rng.sample(cities, 3)
        orgs.append(
            Entity(
                "org",
                nm,
                {
                    "founder": founder.name,
                    "hq": hq.name,
                    "offices": [off1.name, off2.name],
                    "year": founder.attrs["birth_year"] + rng.randrange(22, 50),
                    "industry": industry,
                    "product": product,
                    "employees": rng.randrange(40, 9000),
                },
            )
        )
        founder.attrs["founded"] = nm
    return {"country": countries, "river": rivers, "city": cities, "person": people, "org": orgs}
