"""How the synthetic world is written: passages (wiki-18 style), distractors, and questions.

Primary passages state the facts questions ask about; paraphrase passages restate some of them
in other words; distractor passages mention the same names without any asked-about fact.
Question templates carry, per hop, the gold search query and the supporting passage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sr1.data.synth_world import (
    FIELDS,
    OCCUPATIONS,
    Entity,
    SynthConfig,
)


@dataclass
class Passage:
    title: str
    text: str
    key: str | None = None  # "primary:<entity>" for the passage that states its facts
    pid: str = ""

    @property
    def contents(self) -> str:
        return f'"{self.title}"\n{self.text}'


def _a(word: str) -> str:
    """``word`` with its indefinite article ("an engineer", "a poet")."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _num(n: int) -> str:
    return f"{n:,}"


def entity_passages(
    w: dict[str, list[Entity]], cfg: SynthConfig, rng: random.Random
) -> list[Passage]:
    """Primary passages (one per entity, the facts questions ask about) and paraphrases."""
    country_of = {c.name: c.attrs["country"] for c in w["city"]}
    out: list[Passage] = []
    for c in w["country"]:
        a = c.attrs
        out.append(
            Passage(
                c.name,
                (
                    f"{c.name} is a country whose capital is {a['capital']}. It borders {a['neighbour']} "
                    f"and has about {a['millions']} million inhabitants. Its official language is "
                    f"{a['language']}."
                ),
                f"primary:{c.name}",
            )
        )
    for r in w["river"]:
        a = r.attrs
        through = (
            " and ".join(a["cities"])
            if len(a["cities"]) <= 2
            else (", ".join(a["cities"][:-1]) + " and " + a["cities"][-1])
        )
        out.append(
            Passage(
                r.name,
                (
                    f"The {r.name} is a river in {a['country']}. It rises in the {a['hills']} Hills and "
                    f"flows through {through} before reaching the {a['sea']} Sea. It is about "
                    f"{a['km']} kilometres long."
                ),
                f"primary:{r.name}",
            )
        )
    for c in w["city"]:
        a = c.attrs
        if rng.random() < 0.5:
            text = (
                f"{c.name} is a city in {a['country']} with a population of about "
                f"{_num(a['population'])}. It lies on the {a['river']}, {a['direction']} of "
                f"{a['neighbour']}. Its economy is based on {a['trade']}."
            )
        else:
            text = (
                f"{c.name} is a town in {a['country']}. The {a['river']} flows through the "
                f"town centre, and a railway links {c.name} with {a['neighbour']}. The town is "
                f"known for {a['landmark']}."
            )
        out.append(Passage(c.name, text, f"primary:{c.name}"))
        if rng.random() < cfg.paraphrase_rate:
            out.append(
                Passage(
                    c.name,
                    (
                        f"{c.name} grew up around a ford on the {a['river']}. The old town was rebuilt "
                        f"after a great fire in {a['rebuilt']}, and today {c.name} is famous for "
                        f"{a['landmark']} and its {a['trade']}."
                    ),
                )
            )
    for p in w["person"]:
        a = p.attrs
        she, her, She = a["pron"]
        last = p.name.split(" ", 1)[1]
        if rng.random() < 0.5:
            text = (
                f"{p.name} (born {a['birth_year']}) is {_a(a['occupation'])} from "
                f"{country_of[a['birth_city']]}. {She} was born in {a['birth_city']} and later "
                f"moved to {a['residence']}, where {she} still lives. {last} is best known for "
                f"{her} work on {a['topic']}."
            )
        else:
            text = (
                f"{p.name} is {_a(a['occupation'])} known for {her} work on {a['topic']}. Born "
                f"in {a['birth_city']} in {a['birth_year']}, {last} studied in {a['studied']} "
                f"before settling in {a['residence']}, where {she} lives today."
            )
        out.append(Passage(p.name, text, f"primary:{p.name}"))
        if rng.random() < cfg.paraphrase_rate:
            out.append(
                Passage(
                    p.name,
                    (
                        f"{last} grew up in {a['birth_city']} in a family of {rng.choice(OCCUPATIONS)}s. "
                        f"After years of study {she} made {a['residence']} {her} home, and {her} later "
                        f"work on {a['topic']} was done there."
                    ),
                )
            )
    for o in w["org"]:
        a = o.attrs
        if rng.random() < 0.5:
            text = (
                f"{o.name} is {_a(a['industry'])} company based in {a['hq']}. It was founded in "
                f"{a['year']} by {a['founder']}. The company employs about "
                f"{_num(a['employees'])} people and is known for its {a['product']}."
            )
        else:
            text = (
                f"{o.name} is {_a(a['industry'])} firm established by {a['founder']} in "
                f"{a['year']}. Its headquarters are in {a['hq']}, and it has smaller offices "
                f"in {a['offices'][0]} and {a['offices'][1]}."
            )
        out.append(Passage(o.name, text, f"primary:{o.name}"))
        if rng.random() < cfg.paraphrase_rate:
            out.append(
                Passage(
                    o.name,
                    (
                        f"In {a['year']}, {a['founder']} opened a small {a['industry']} workshop in "
                        f"{a['hq']}. The workshop grew into {o.name}, which now sells its {a['product']} "
                        f"across {country_of[a['hq']]}."
                    ),
                )
            )
    return out


def distractors(w: dict[str, list[Entity]], cfg: SynthConfig, rng: random.Random) -> list[Passage]:
    """Passages that mention the world's names without stating any asked-about fact."""
    people, cities, orgs, rivers = w["person"], w["city"], w["org"], w["river"]
    out: list[Passage] = []
    by_stem: dict[str, list[Entity]] = {}
    for o in orgs:
        by_stem.setdefault(o.name.split(" ")[0], []).append(o)
    for stem, group in by_stem.items():
        if len(group) > 1:
            items = "; ".join(f"{o.name}, {_a(o.attrs['industry'])} company" for o in group)
            out.append(Passage(f"{stem} (disambiguation)", f"{stem} may refer to: {items}."))
    by_last: dict[str, list[Entity]] = {}
    for p in people:
        by_last.setdefault(p.name.split(" ", 1)[1], []).append(p)
    for last, group in by_last.items():
        if len(group) > 1:
            a, b = group[0], group[1]
            out.append(
                Passage(
                    f"{last} family",
                    (
                        f"The {last} family has produced several notable people, including {a.name}, "
                        f"{_a(a.attrs['occupation'])}, and {b.name}, {_a(b.attrs['occupation'])}. The name is "
                        f"common in {rng.choice(w['country']).name}."
                    ),
                )
            )

    def fair() -> Passage:
        c, c2, c3 = rng.sample(cities, 3)
        y = rng.randrange(1880, 1990)
        return Passage(
            f"{y} {c.name} Fair",
            (
                f"The {y} {c.name} Fair was a trade fair held in {c.name}. Merchants from {c2.name} "
                f"and {c3.name} attended, and {rng.choice(people).name} gave the opening speech. It "
                f"lasted {rng.randrange(3, 15)} days."
            ),
        )

    def prize() -> Passage:
        p1, p2 = rng.sample(people, 2)
        last = rng.choice(people).name.split(" ", 1)[1]
        return Passage(
            f"{last} Prize",
            (
                f"The {last} Prize is an award for {rng.choice(FIELDS)} presented every year in "
                f"{rng.choice(cities).name}. Past winners include {p1.name} and {p2.name}."
            ),
        )

    def case() -> Passage:
        o1, o2 = rng.sample(orgs, 2)
        y = rng.randrange(1900, 1995)
        return Passage(
            f"{o1.name} v. {o2.name}",
            (
                f"{o1.name} v. {o2.name} was a {y} court case in {rng.choice(cities).name} about a "
                f"supply contract between the two companies. The court ruled for {o1.name}."
            ),
        )

    def expedition() -> Passage:
        r = rng.choice(rivers)
        y = rng.randrange(1880, 1990)
        along = r.attrs["cities"]
        span = f"between {along[0]} and {along[1]}" if len(along) > 1 else f"near {along[0]}"
        return Passage(
            f"{y} {r.name} expedition",
            (
                f"The {y} {r.name} expedition was a survey of the river led by "
                f"{rng.choice(people).name}. The team mapped the {r.name} {span}."
            ),
        )

    makers = [fair, fair, prize, case, expedition]
    target = round(cfg.distractor_rate * sum(len(v) for v in w.values()))
    seen = {p.title for p in out}
    while len(out) < target:
        p = rng.choice(makers)()
        if p.title not in seen:
            seen.add(p.title)
            out.append(p)
    return out


def questions(w: dict[str, list[Entity]], pid: dict[str, str], rng: random.Random) -> list[dict]:
    """Every candidate question (single- and two-hop) with answers, queries and support ids."""
    person = {p.name: p for p in w["person"]}
    city = {c.name: c for c in w["city"]}
    qs: list[dict] = []

    def q(
        rel: str,
        text: str,
        answers: list[str],
        subject: str,
        queries: list[str],
        support: list[str],
        bridge: str | None = None,
    ) -> None:
        qs.append(
            {
                "question": text,
                "golden_answers": answers,
                "metadata": {
                    "data_source": "synth",
                    "hops": len(support),
                    "relation": rel,
                    "subject": subject,
                    "bridge": bridge,
                    "queries": queries,
                    "support": [pid[s] for s in support],
                },
            }
        )

    def river_answers(r: str) -> list[str]:
        return [r, r.removesuffix(" River")]

    for o in w["org"]:
        a, f = o.attrs, person[o.attrs["founder"]]
        q(
            "founder",
            rng.choice([f"Who founded {o.name}?", f"Who is the founder of {o.name}?"]),
            [f.name],
            o.name,
            [f"{o.name} founded established by"],
            [o.name],
        )
        q(
            "headquarters",
            rng.choice([f"In which city is {o.name} headquartered?", f"Where is {o.name} based?"]),
            [a["hq"]],
            o.name,
            [f"{o.name} headquarters based"],
            [o.name],
        )
        q(
            "founding_year",
            rng.choice([f"In what year was {o.name} founded?", f"When was {o.name} established?"]),
            [str(a["year"])],
            o.name,
            [f"{o.name} founded established"],
            [o.name],
        )
        q(
            "founded_by",
            f"Which company did {f.name} found?",
            [o.name],
            f.name,
            [f"company founded established by {f.name}"],
            [o.name],
        )
        q(
            "founder_birthplace",
            f"In which city was the founder of {o.name} born?",
            [f.attrs["birth_city"]],
            o.name,
            [f"{o.name} founded established by", f"{f.name} birthplace"],
            [o.name, f.name],
            bridge=f.name,
        )
        q(
            "founder_birth_year",
            f"In what year was the founder of {o.name} born?",
            [str(f.attrs["birth_year"])],
            o.name,
            [f"{o.name} founded established by", f"{f.name} born year"],
            [o.name, f.name],
            bridge=f.name,
        )
        q(
            "headquarters_river",
            f"Which river flows through the city where {o.name} is headquartered?",
            river_answers(city[a["hq"]].attrs["river"]),
            o.name,
            [f"{o.name} headquarters based", f"{a['hq']} river"],
            [o.name, a["hq"]],
            bridge=a["hq"],
        )
    for p in w["person"]:
        a = p.attrs
        q(
            "birthplace",
            rng.choice([f"In which city was {p.name} born?", f"Where was {p.name} born?"]),
            [a["birth_city"]],
            p.name,
            [f"{p.name} birthplace"],
            [p.name],
        )
        q(
            "residence",
            rng.choice([f"In which city does {p.name} live?", f"Where does {p.name} live?"]),
            [a["residence"]],
            p.name,
            [f"where does {p.name} live"],
            [p.name],
        )
        q(
            "birthplace_river",
            rng.choice(
                [
                    f"Which river flows through the city where {p.name} was born?",
                    f"Which river flows through the birthplace of {p.name}?",
                ]
            ),
            river_answers(city[a["birth_city"]].attrs["river"]),
            p.name,
            [f"{p.name} birthplace", f"{a['birth_city']} river"],
            [p.name, a["birth_city"]],
            bridge=a["birth_city"],
        )
        q(
            "residence_river",
            f"Which river flows through the city where {p.name} lives?",
            river_answers(city[a["residence"]].attrs["river"]),
            p.name,
            [f"where does {p.name} live", f"{a['residence']} river"],
            [p.name, a["residence"]],
            bridge=a["residence"],
        )
    for c in w["city"]:
        q(
            "river",
            rng.choice(
                [f"Which river flows through {c.name}?", f"What river runs through {c.name}?"]
            ),
            river_answers(c.attrs["river"]),
            c.name,
            [f"{c.name} river"],
            [c.name],
        )
    return qs
