"""The synthetic evaluation corpus: invented people, cities and organisations whose facts are spread
across documents, with single-hop and two-hop questions and their gold answers and sentences; and the
chunking set (documents on different topics concatenated, gold boundaries at the joins).

Everything is a pure function of the seed. The entities are invented (rag.eval.names), so a model can only
answer from retrieved text. A two-hop question names one entity and asks about another reached through it
("In which city was the founder of Brenvik Labs born?"): the organisation's document names the founder,
the founder's document names the city, and neither document holds both facts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from longbow.rag.eval.names import NameMaker
from longbow.rag.types import Document

DEFAULT_NUM_DOCUMENTS = 60

_PROFESSIONS = ["botanist", "architect", "composer", "engineer", "historian", "painter", "physician",
                "cartographer", "chemist", "poet", "astronomer", "sculptor"]
_WORKS = ["a survey of tidal clocks", "a treatise on glass harmonicas", "a map of the northern marshes",
          "a cycle of winter songs", "a new method for dyeing wool", "a study of migrating eels",
          "a bridge made of woven cane", "an atlas of forgotten roads", "a theory of slow fires"]
_INDUSTRIES = ["shipbuilding", "textile", "software", "glassware", "publishing", "aerospace",
               "pharmaceutical", "farm machinery", "clockmaking", "ceramics"]
_PRODUCTS = ["its silent pumps", "its folding kayaks", "its salt-glazed tiles", "its pocket looms",
             "its weather balloons", "its cheap printing presses", "its copper kettles", "its night lamps"]
_FEATURES = ["covered markets", "stone bridges", "lantern festival", "copper roofs", "old observatory",
             "salt mines", "floating gardens", "clock tower"]


@dataclass(frozen=True)
class Question:
    """gold_spans: (document id, char start, char end) of each sentence holding a supporting fact, in hop
    order; the gold answer appears verbatim in the last one."""

    qid: str
    text: str
    answer: str
    hops: int
    gold_document_ids: list[str]
    gold_spans: list[tuple[str, int, int]]


@dataclass
class Corpus:
    documents: list[Document]
    questions: list[Question]

    def document(self, document_id: str) -> Document:
        return next(d for d in self.documents if d.document_id == document_id)


@dataclass(frozen=True)
class ChunkingSample:
    """text: documents joined by one space; boundaries: char offset where each document after the
    first starts (ascending, never 0 or len(text))."""

    text: str
    boundaries: list[int]


@dataclass
class _Person:
    name: str
    profession: str
    birth_city: str
    birth_year: int
    home_city: str | None


@dataclass
class _City:
    name: str
    region: str
    river: str
    population: int
    feature: str


@dataclass
class _Organisation:
    name: str
    industry: str
    founder: str
    year: int
    headquarters: str
    product: str


@dataclass
class _Written:
    """A rendered document and the char span of each keyed fact sentence in it."""

    document: Document
    spans: dict[str, tuple[int, int]]


def _assemble(document_id: str, kind: str, title: str, sentences: list[tuple[str | None, str]]) -> _Written:
    text, spans = "", {}
    for key, sentence in sentences:
        text += (" " if text else "")
        if key is not None:
            spans[key] = (len(text), len(text) + len(sentence))
        text += sentence
    return _Written(Document(document_id, text, {"kind": kind, "title": title}), spans)


# --- entities -------------------------------------------------------------------------------------------

def _make_cities(rng: random.Random, names: NameMaker, count: int) -> list[_City]:
    regions = [names.word(rng.choice([2, 3])) for _ in range(max(2, count // 4))]
    return [_City(names.place(), rng.choice(regions), names.word(1 if rng.random() < 0.5 else 2),
                  rng.randrange(8, 900) * 1000, rng.choice(_FEATURES)) for _ in range(count)]


def _make_people(rng: random.Random, names: NameMaker, count: int, cities: list[_City]) -> list[_Person]:
    people = []
    for _ in range(count):
        birth = rng.choice(cities).name
        home = rng.choice([c.name for c in cities if c.name != birth]) if rng.random() < 0.5 else None
        name = names.person()  # NOTE: draw order is part of the corpus: name, profession, year
        profession, year = rng.choice(_PROFESSIONS), rng.randrange(1850, 2000)
        people.append(_Person(name, profession, birth, year, home))
    return people


def _make_organisations(rng: random.Random, names: NameMaker, count: int, people: list[_Person],
                        cities: list[_City]) -> list[_Organisation]:
    founders = rng.sample(people, count)  # NOTE: one organisation per founder, so "the founder of" is unique
    return [_Organisation(names.organisation(), rng.choice(_INDUSTRIES), founder.name,
                          rng.randrange(max(founder.birth_year + 20, 1880), 2021), rng.choice(cities).name,
                          rng.choice(_PRODUCTS)) for founder in founders]


# --- documents ------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _person_sentences(rng: random.Random, person: _Person) -> list[tuple[str | None, str]]:
    first = person.name.split()[0]
    profession = person.profession
    work = rng.choice(_WORKS)
    sentences = [(None, f"{person.name} is {_article(profession)} {profession} known for {work}."),
                 ("born", f"{person.name} was born in {person.birth_city} in {person.birth_year}.")]
    if rng.random() < 0.5:
        sentences.append((None, f"As a young {profession}, {first} worked for many years without pay."))
    if person.home_city:
        sentences.append((None, f"Today {first} lives in {person.home_city}."))
    return sentences


def _organisation_sentences(rng: random.Random, organisation: _Organisation) -> list[tuple[str | None, str]]:
    name = organisation.name
    return [(None, f"{name} is {_article(organisation.industry)} {organisation.industry} company."),
            ("founded", f"{name} was founded in {organisation.year} by {organisation.founder}."),
            ("headquarters", f"The headquarters of {name} are in {organisation.headquarters}."),
            (None, f"{name} employs about {rng.randrange(20, 5000)} people and is known for "
                   f"{organisation.product}.")]


def _city_sentences(rng: random.Random, city: _City) -> list[tuple[str | None, str]]:
    return [("region", f"{city.name} is a city in the region of {city.region}."),
            ("river", f"The river {city.river} flows through {city.name}."),
            (None, f"{city.name} has about {city.population} inhabitants and is known for its "
                   f"{city.feature}.")]


def _entity_counts(num_documents: int) -> tuple[int, int, int]:
    if num_documents < 6:
        raise ValueError("make_corpus needs num_documents >= 6")
    cities = max(2, round(num_documents * 0.25))
    organisations = max(1, round(num_documents * 0.3))
    return cities, num_documents - cities - organisations, organisations


# --- questions ------------------------------------------------------------------------------------------

@dataclass
class _Index:
    """Rendered documents by entity name, to resolve gold sentences."""

    written: dict[str, _Written]

    def span(self, entity: str, key: str) -> tuple[str, int, int]:
        written = self.written[entity]
        return (written.document.document_id, *written.spans[key])


def _question(kind: str, number: int, text: str, answer: str, spans: list[tuple[str, int, int]]) -> Question:
    documents = list(dict.fromkeys(span[0] for span in spans))
    return Question(f"{kind}-{number:03d}", text, answer, len(spans), documents, spans)


def _single_hop_questions(index: _Index, people, organisations, cities) -> list[Question]:
    questions = []
    for i, p in enumerate(people):
        questions.append(_question("birth_city", i, f"In which city was {p.name} born?", p.birth_city,
                                   [index.span(p.name, "born")]))
    for i, o in enumerate(organisations):
        questions.append(_question("founder", i, f"Who founded {o.name}?", o.founder,
                                   [index.span(o.name, "founded")]))
        questions.append(_question("founding_year", i, f"In which year was {o.name} founded?", str(o.year),
                                   [index.span(o.name, "founded")]))
    for i, c in enumerate(cities):
        questions.append(_question("region", i, f"In which region is {c.name}?", c.region,
                                   [index.span(c.name, "region")]))
    return questions


def _two_hop_questions(index: _Index, people, organisations, cities) -> list[Question]:
    person_by_name = {p.name: p for p in people}
    city_by_name = {c.name: c for c in cities}
    questions = []
    for i, o in enumerate(organisations):
        founder = person_by_name[o.founder]
        text = f"In which city was the founder of {o.name} born?"
        questions.append(_question("founder_birth_city", i, text, founder.birth_city,
                                   [index.span(o.name, "founded"), index.span(founder.name, "born")]))
        questions.append(_question("headquarters_region", i,
                                   f"In which region is the city where {o.name} has its headquarters?",
                                   city_by_name[o.headquarters].region,
                                   [index.span(o.name, "headquarters"),
                                    index.span(o.headquarters, "region")]))
    for i, p in enumerate(people):
        text = f"Which river flows through the city where {p.name} was born?"
        questions.append(_question("birthplace_river", i, text,
                                   city_by_name[p.birth_city].river,
                                   [index.span(p.name, "born"), index.span(p.birth_city, "river")]))
    return questions


def make_corpus(seed: int, num_documents: int = DEFAULT_NUM_DOCUMENTS) -> Corpus:
    """num_documents documents (about 25% cities, 30% organisations, the rest people) and every question
    the facts support, shuffled; documents are shuffled too, with ids doc-0000... in that order."""
    rng = random.Random(seed)
    names = NameMaker(rng)
    num_cities, num_people, num_organisations = _entity_counts(num_documents)
    cities = _make_cities(rng, names, num_cities)
    people = _make_people(rng, names, num_people, cities)
    organisations = _make_organisations(rng, names, num_organisations, people, cities)
    entities = ([(p.name, "person", _person_sentences(rng, p)) for p in people]
                + [(o.name, "organisation", _organisation_sentences(rng, o)) for o in organisations]
                + [(c.name, "city", _city_sentences(rng, c)) for c in cities])
    rng.shuffle(entities)
    written = {name: _assemble(f"doc-{i:04d}", kind, name, sentences)
               for i, (name, kind, sentences) in enumerate(entities)}
    index = _Index(written)
    questions = (_single_hop_questions(index, people, organisations, cities)
                 + _two_hop_questions(index, people, organisations, cities))
    rng.shuffle(questions)
    return Corpus([w.document for w in written.values()], questions)


# --- chunking set ---------------------------------------------------------------------------------------

_TOPIC_TEMPLATES: dict[str, list[str]] = {
    "recipe": ["{name} stew is a dish from the coastal villages.",
               "To make it, soak two cups of white beans overnight and drain them in the morning.",
               "Fry an onion in butter until it turns golden, then add the beans and a spoon of paprika.",
               "Pour in enough broth to cover everything and let the pot simmer for two hours.",
               "Some cooks add smoked fish at the end, others prefer a handful of chopped parsley.",
               "Serve it hot with dark bread and a glass of cider."],
    "ship": ["The {name} was a three-masted merchant ship launched in {year}.",
             "She carried timber, tar and salted cod between the northern ports.",
             "Her hull was built of oak and sheathed in copper to keep away shipworm.",
             "In a winter storm she lost her mainmast and drifted for eleven days.",
             "The crew survived on rainwater and the last barrel of biscuits.",
             "She was finally broken up for scrap after forty years of service."],
    "festival": ["The {name} festival takes place every spring when the ice breaks on the lake.",
                 "Families build small rafts from reeds and decorate them with candles.",
                 "At dusk the rafts are pushed onto the water while a choir sings.",
                 "Children compete to guess which raft will drift the farthest.",
                 "Street vendors sell honey cakes and hot spiced milk.",
                 "The celebration ends at midnight with a single drumbeat."],
    "species": ["The {name} beetle lives only in the bark of old pine trees.",
                "Adults are about two centimetres long and have a metallic green shell.",
                "The larvae feed on fungus that grows inside decaying wood.",
                "During the summer the beetles gather in large swarms at dusk.",
                "Woodpeckers are their most common predator.",
                "Logging has reduced its habitat, and it is now considered rare."],
    "mountain": ["Mount {name} rises above a wide glacial valley.",
                 "Its summit is covered in snow for most of the year.",
                 "The first recorded ascent took place in {year} by a team of surveyors.",
                 "A narrow ridge on the eastern face is known for sudden rockfalls.",
                 "Climbers usually spend a night at the hut below the final slope.",
                 "On clear days the peak can be seen from the sea."],
    "software": ["{name} is an open-source program for synchronising files between computers.",
                 "It watches folders for changes and sends only the modified blocks over the network.",
                 "Conflicts are resolved by keeping both versions and renaming the older one.",
                 "The project is written in a systems language and has no central server.",
                 "Version two added end-to-end encryption and a command-line interface.",
                 "Volunteers maintain it and publish a new release every few months."],
}


def _topic_document(rng: random.Random, names: NameMaker, topic: str) -> str:
    if topic in _TOPIC_TEMPLATES:
        templates = _TOPIC_TEMPLATES[topic]
        chosen = [templates[0], *sorted(rng.sample(templates[1:], rng.randrange(3, len(templates))),
                                        key=templates.index)]
        return " ".join(t.format(name=names.word(2), year=rng.randrange(1700, 1990)) for t in chosen)
    cities = _make_cities(rng, names, 3)
    if topic == "person":
        sentences = _person_sentences(rng, _make_people(rng, names, 1, cities)[0])
    elif topic == "organisation":
        people = _make_people(rng, names, 1, cities)
        sentences = _organisation_sentences(rng, _make_organisations(rng, names, 1, people, cities)[0])
    else:
        sentences = _city_sentences(rng, cities[0])
    return " ".join(sentence for _, sentence in sentences)


_ALL_TOPICS = [*_TOPIC_TEMPLATES, "person", "organisation", "city"]


def _topic_sequence(rng: random.Random, count: int) -> list[str]:
    topics = [rng.choice(_ALL_TOPICS)]
    while len(topics) < count:
        topics.append(rng.choice([t for t in _ALL_TOPICS if t != topics[-1]]))
    return topics


def make_chunking_set(seed: int, num_samples: int) -> list[ChunkingSample]:
    """num_samples texts, each 3 to 6 documents whose neighbours differ in topic, joined by one space
    (NOTE: no blank lines, so a paragraph splitter cannot read the boundaries off the layout)."""
    rng = random.Random(seed)
    names = NameMaker(rng)
    samples = []
    for _ in range(num_samples):
        documents = [_topic_document(rng, names, t) for t in _topic_sequence(rng, rng.randrange(3, 7))]
        text, boundaries = documents[0], []
        for document in documents[1:]:
            text += " "
            boundaries.append(len(text))
            text += document
        samples.append(ChunkingSample(text, boundaries))
    return samples
