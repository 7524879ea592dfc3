"""A built-in fictional world whose queries need reasoning before retrieval.

Search-R3's claim is that an LLM which reasons about a query before embedding it
retrieves better than one that embeds the query's words as they stand. Public
collections mix easy and hard queries in unknown proportions, so this module builds
a world where the difficulty of each query is known by construction and tagged in
its id:

* ``lex-NNNN`` (lexical): the query reuses the words of its document, so a
  bag-of-words matcher finds it. The sanity baseline.
* ``ind-NNNN`` (indirect): the document names a thing by its term ("cooper"), the
  query only describes it ("maker of wooden casks and barrels"). One step of
  inference, recalling the term, closes the gap.
* ``hop-NNNN`` (two-hop): the query picks out its answer through a second document
  ("the cooper born in the town at the estuary of the Quell"). The answering
  document has grade 2, the bridging one grade 1.

Every name is made of invented syllables, so no pretrained model knows these facts:
it can only reason about the words. Distractor documents (fair notices, namesakes,
people who work in one town and were born in another) share surface words with the
queries without answering them. All randomness comes from
``numpy.random.default_rng(seed)`` in a fixed order, so a seed gives a byte-identical
collection and therefore the same ``fingerprint``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from searchr3_env.dataset import Document, RetrievalDataset

NAME = "synthetic-v1"
QUERY_KINDS = {"lex": "lexical", "ind": "indirect", "hop": "two_hop"}

ANSWER_GRADE = 2  # the document that answers the query
SUPPORT_GRADE = 1  # the document a two-hop query passes through on the way


# --- the lexicon: terms documents use, and descriptions queries use instead ---------


@dataclass(frozen=True)
class Term:
    """A word documents are written with, and a description that avoids it.

    Each description is written so that it shares no word stem with its term: the
    only way from the description to the document is knowing what the term means.
    """

    category: str
    word: str
    description: str


def _terms(category: str, pairs: tuple[tuple[str, str], ...]) -> tuple[Term, ...]:
    return tuple(Term(category, word, description) for word, description in pairs)


# People "were a <profession>"; queries ask for "the <description> born in <town>".
PROFESSIONS = _terms("profession", (
    ("glassblower", "artisan who inflates molten silica into bottles and bowls"),
    ("cooper", "maker of wooden casks and barrels"),
    ("farrier", "craftsman who nails iron shoes onto horses' hooves"),
    ("cartographer", "draughtsman who draws maps of coasts and roads"),
    ("apothecary", "dispenser of remedies and medicines"),
    ("chandler", "maker of candles and lamp wicks"),
    ("wheelwright", "builder of spoked rims for carts and carriages"),
    ("tanner", "worker who cures animal hides into leather"),
    ("luthier", "craftsman who builds violins and guitars"),
    ("stonemason", "builder who cuts and lays blocks of rock"),
    ("astronomer", "scholar who charts the stars and planets"),
    ("beekeeper", "tender of hives who gathers honey"),
    ("vintner", "maker of wine from grapes"),
    ("bookbinder", "craftsman who sews and covers the pages of books"),
))

# Towns are "known for their <material>"; trading houses "deal in <material>".
MATERIALS = _terms("material", (
    ("porcelain", "fine translucent white ceramic"),
    ("amber", "fossilised tree resin"),
    ("saffron", "costly red spice from crocus flowers"),
    ("indigo", "deep blue dye from a leafy plant"),
    ("pewter", "grey alloy made mostly of tin"),
    ("obsidian", "black volcanic glass"),
    ("vellum", "fine writing skin made from calfskin"),
    ("graphite", "soft black carbon used for pencil leads"),
    ("tallow", "rendered animal fat"),
    ("flax", "plant fibre spun into linen"),
))

# Towns "lie at the <landform> of the <river>"; queries say "where the <river> <description>".
LANDFORMS = _terms("landform", (
    ("estuary", "widens into a tidal mouth meeting the sea"),
    ("gorge", "cuts a deep narrow cleft through rock"),
    ("confluence", "is joined by another stream"),
    ("headwaters", "first rises from its springs"),
    ("rapids", "tumbles over fast broken white water"),
    ("meander", "swings through a wide looping bend"),
    ("floodplain", "spills over flat fields in wet seasons"),
    ("waterfall", "plunges over a sheer cliff"),
))

# Some people "played the <instrument>".
INSTRUMENTS = _terms("instrument", (
    ("hurdy-gurdy", "stringed box sounded by a cranked wheel"),
    ("bassoon", "low woodwind with a double reed"),
    ("harpsichord", "keyboard whose strings are plucked by quills"),
    ("dulcimer", "zither struck with small hammers"),
    ("bagpipes", "reeds sounded from a squeezed leather sack"),
    ("ocarina", "small egg-shaped clay flute"),
    ("glockenspiel", "set of tuned steel bars struck with mallets"),
    ("sackbut", "early brass horn with a sliding tube"),
))

LEXICON = PROFESSIONS + MATERIALS + LANDFORMS + INSTRUMENTS


# --- document templates ------------------------------------------------------------

_BIO_OPENINGS = (
    "{name} ({born}-{died}) was a {trade} born in {town}.",
    "Born in {town} in {born}, {name} worked as a {trade} for most of {pos} life.",
    "{name} was a {trade}, born in {town} in {born}.",
)
_BIO_WORK = (
    "{Pron} kept a workshop in {work} from {settled}.",
    "After an apprenticeship {pron} settled in {work}, where {pron} took on pupils of {pos} own.",
)
_BIO_MUSIC = "In the evenings {pron} played the {instrument} in the {work} town band."
_BIO_END = "{Pron} died in {work} in {died}."
_TOWN_TEXT = (
    "{town} is a market town on the river {river}. It lies at the {landform} of the {river} "
    "and is known for its {material}. The market is held every {weekday}, and by {year} the "
    "town counted some {population} inhabitants. Its nearest neighbour is {neighbour}."
)
_RIVER_TEXT = (
    "The {river} is a river of some {length} miles. It rises in the {hills} Hills and flows "
    "past {towns} before reaching the sea."
)
_COMPANY_TEXT = (
    "{company} is a trading house in {town}, founded in {year} by {founder}. It deals in "
    "{material}, which it ships along the {river}."
)
_INVENTION_TEXT = (
    "The {invention} is a {device} invented by {inventor} in {year}. It was first used in "
    "{town}, and {trades} along the {river} soon took it up."
)
_NOTICE_TEXT = (
    "At the {season} fair of {year} in {town}, {trades} and {other_trades} from along the "
    "{river} set out their stalls. A player of the {instrument} led the dancing, and the prize for "
    "the finest {material} went to {winner} of {winner_town}."
)
_DEVICES = ("press", "loom", "lathe", "lamp", "pump", "kiln", "compass", "clock", "bellows",
            "sextant", "winch", "furnace", "spindle", "telescope")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_SEASONS = ("spring", "summer", "autumn", "winter")


# --- invented names ----------------------------------------------------------------

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r",
           "s", "sk", "st", "t", "th", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "k", "m", "nd", "rk", "sk", "th")
_TOWN_SUFFIXES = ("mere", "holm", "wick", "by", "stead", "thorpe", "ley", "ham", "stow")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


# A name must never be a word the templates or lexicon use, or contain a lexicon term,
# or a lexical matcher would link documents through the name instead of the facts.
_RESERVED = frozenset(_words(" ".join(
    _BIO_OPENINGS + _BIO_WORK + (_BIO_MUSIC, _BIO_END, _TOWN_TEXT, _RIVER_TEXT,
                                 _COMPANY_TEXT, _INVENTION_TEXT, _NOTICE_TEXT)
    + _DEVICES + _WEEKDAYS + _SEASONS
    + tuple(t.word + " " + t.description for t in LEXICON)
)))
_TERM_WORDS = tuple(t.word for t in LEXICON)


class _Names:
    """Draws pronounceable invented names, each used once across the whole world."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.used: set[str] = set()

    def _syllable(self, coda: bool) -> str:
        return (_pick(self.rng, _ONSETS) + _pick(self.rng, _VOWELS)
                + (_pick(self.rng, _CODAS) if coda else ""))

    def new(self, syllables: int = 2, suffix: str = "") -> str:
        """A fresh name; only the last syllable may close on a consonant, to keep it sayable."""
        while True:
            low = "".join(self._syllable(i == syllables - 1) for i in range(syllables)) + suffix
            if low in self.used or low in _RESERVED or any(t in low for t in _TERM_WORDS):
                continue
            self.used.add(low)
            return low.capitalize()


def _pick(rng: np.random.Generator, items):
    """One item drawn uniformly (rng.choice is slow on Python sequences)."""
    return items[int(rng.integers(len(items)))]


def _shuffled(rng: np.random.Generator, items: list) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def _plural(word: str) -> str:
    return word[:-1] + "ies" if word.endswith("y") else word + "s"


def _joined(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# --- the world -----------------------------------------------------------------------


@dataclass(frozen=True)
class Town:
    doc_id: str
    name: str
    river: str
    landform: Term
    material: Term


@dataclass(frozen=True)
class Person:
    doc_id: str
    name: str
    surname: str
    trade: Term
    town: Town  # where they were born
    work: Town  # where they worked and died
    born: int
    instrument: Term | None


@dataclass(frozen=True)
class Company:
    doc_id: str
    name: str
    founder: Person
    town: Town
    year: int
    material: Term


@dataclass(frozen=True)
class Invention:
    doc_id: str
    name: str
    inventor: Person
    year: int


@dataclass
class _World:
    towns: list[Town]
    rivers: dict[str, list[Town]]
    people: list[Person]
    companies: list[Company]
    inventions: list[Invention]
    documents: dict[str, Document]


def _make_towns(rng, names: _Names, n_towns: int, n_rivers: int) -> tuple[list[Town], dict[str, list[Town]]]:
    """Towns spread round-robin over rivers. Within one river no two towns share a
    landform or a material, so "the town at the estuary of the Quell" names one town."""
    rivers = [names.new() for _ in range(n_rivers)]
    landforms = {r: _shuffled(rng, list(LANDFORMS)) for r in rivers}
    materials = {r: _shuffled(rng, list(MATERIALS)) for r in rivers}
    towns, by_river = [], {r: [] for r in rivers}
    for i in range(n_towns):
        river = rivers[i % n_rivers]
        k = len(by_river[river])
        town = Town(f"town-{i + 1:04d}", names.new(int(rng.integers(1, 3)), _pick(rng, _TOWN_SUFFIXES)),
                    river, landforms[river][k], materials[river][k])
        towns.append(town)
        by_river[river].append(town)
    return towns, by_river


def _make_people(rng, names: _Names, towns: list[Town], n_people: int) -> list[Person]:
    """People with distinct full names drawn from shared pools of given and family
    names, so namesakes occur as they do in real collections."""
    given = [names.new() for _ in range(max(20, n_people // 10))]
    family = [names.new() for _ in range(max(20, n_people // 5))]
    seen, people = set(), []
    while len(people) < n_people:
        first, last = _pick(rng, given), _pick(rng, family)
        if (first, last) in seen:
            continue
        seen.add((first, last))
        town = _pick(rng, towns)
        work = town if rng.random() < 0.5 else _pick(rng, towns)
        instrument = _pick(rng, INSTRUMENTS) if rng.random() < 0.4 else None
        people.append(Person(f"person-{len(people) + 1:04d}", f"{first} {last}", last,
                             _pick(rng, PROFESSIONS), town, work, int(rng.integers(1650, 1850)),
                             instrument))
    return people


def _make_companies(rng, people: list[Person], n_companies: int) -> list[Company]:
    """Each founder founds one house, in the town they worked in (not necessarily
    the one they were born in, so the founder's biography is a real bridge)."""
    founders = [people[i] for i in rng.permutation(len(people))[:n_companies]]
    surnames = sorted({p.surname for p in people})
    used, companies = set(), []
    for i, founder in enumerate(founders):
        name = f"{founder.surname} & {_pick(rng, surnames)}"
        while name in used or name.endswith(f"& {founder.surname}"):
            name = f"{founder.surname} & {_pick(rng, surnames)}"
        used.add(name)
        companies.append(Company(f"company-{i + 1:04d}", name, founder, founder.work,
                                 founder.born + int(rng.integers(25, 50)), _pick(rng, MATERIALS)))
    return companies


def _make_inventions(rng, names: _Names, people: list[Person], n_inventions: int) -> list[Invention]:
    inventors = [people[i] for i in rng.permutation(len(people))[:n_inventions]]
    return [Invention(f"invention-{i + 1:04d}", f"{names.new()} {_pick(rng, _DEVICES)}", p,
                      p.born + int(rng.integers(20, 60)))
            for i, p in enumerate(inventors)]


# --- documents -------------------------------------------------------------------------


def _biography(rng, p: Person) -> Document:
    died = p.born + int(rng.integers(45, 85))
    he = bool(rng.random() < 0.5)
    fill = dict(name=p.name, born=p.born, died=died, trade=p.trade.word, town=p.town.name,
                work=p.work.name, settled=p.born + int(rng.integers(18, 30)),
                pron="he" if he else "she", Pron="He" if he else "She", pos="his" if he else "her",
                instrument=p.instrument.word if p.instrument else "")
    sentences = [_pick(rng, _BIO_OPENINGS), _pick(rng, _BIO_WORK)]
    if p.instrument:
        sentences.append(_BIO_MUSIC)
    sentences.append(_BIO_END)
    return Document(p.name, " ".join(s.format(**fill) for s in sentences))


def _town_article(rng, t: Town, towns: list[Town]) -> Document:
    neighbour = _pick(rng, [o for o in towns if o is not t] or [t])
    return Document(t.name, _TOWN_TEXT.format(
        town=t.name, river=t.river, landform=t.landform.word, material=t.material.word,
        weekday=_pick(rng, _WEEKDAYS), year=int(rng.integers(1700, 1900)),
        population=int(rng.integers(8, 400)) * 50, neighbour=neighbour.name))


def _notice(rng, i: int, towns: list[Town], people: list[Person]) -> tuple[str, Document]:
    """A fair notice: a distractor that mentions trades, instruments, materials, towns
    and a person together, without stating any fact a query asks for."""
    town, winner = _pick(rng, towns), _pick(rng, people)
    trades = _shuffled(rng, list(PROFESSIONS))[:2]
    season, year = _pick(rng, _SEASONS), int(rng.integers(1700, 1900))
    text = _NOTICE_TEXT.format(
        season=season, year=year, town=town.name, trades=_plural(trades[0].word),
        other_trades=_plural(trades[1].word), river=town.river,
        instrument=_pick(rng, INSTRUMENTS).word, material=_pick(rng, MATERIALS).word,
        winner=winner.name, winner_town=winner.work.name)
    return f"notice-{i + 1:04d}", Document(f"{town.name} {season} fair, {year}", text)


def _build_world(rng, names: _Names, n_people, n_towns, n_rivers, n_companies, n_inventions,
                 n_notices) -> _World:
    towns, rivers = _make_towns(rng, names, n_towns, n_rivers)
    people = _make_people(rng, names, towns, n_people)
    companies = _make_companies(rng, people, n_companies)
    inventions = _make_inventions(rng, names, people, n_inventions)

    docs = {p.doc_id: _biography(rng, p) for p in people}
    docs.update({t.doc_id: _town_article(rng, t, towns) for t in towns})
    for i, (river, on_it) in enumerate(rivers.items()):
        docs[f"river-{i + 1:04d}"] = Document(river, _RIVER_TEXT.format(
            river=river, length=int(rng.integers(20, 300)), hills=names.new(),
            towns=_joined([t.name for t in on_it])))
    for c in companies:
        docs[c.doc_id] = Document(c.name, _COMPANY_TEXT.format(
            company=c.name, town=c.town.name, year=c.year, founder=c.founder.name,
            material=c.material.word, river=c.town.river))
    for inv in inventions:
        town = _pick(rng, towns)
        docs[inv.doc_id] = Document(inv.name, _INVENTION_TEXT.format(
            invention=inv.name, device=inv.name.split()[-1], inventor=inv.inventor.name,
            year=inv.year, town=town.name, trades=_plural(_pick(rng, PROFESSIONS).word),
            river=town.river))
    docs.update(_notice(rng, i, towns, people) for i in range(n_notices))
    return _World(towns, rivers, people, companies, inventions, docs)


# --- questions -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Question:
    text: str
    answer: str  # doc id, grade 2
    support: str | None = None  # doc id, grade 1 (two-hop only)


def _only_ones(items: list, key) -> list:
    """Items whose key no other item shares: the ones a question can pick out uniquely."""
    counts = Counter(key(x) for x in items)
    return [x for x in items if key(x) is not None and counts[key(x)] == 1]


def _say(term: Term, indirect: bool) -> str:
    return term.description if indirect else term.word


# Each shape asks about one fact; lexical and indirect queries share the shapes and
# differ only in naming the term or describing it, so the two kinds compare cleanly.

def _ask_trade(w: _World, indirect: bool) -> list[_Question]:
    return [_Question(f"Who was the {_say(p.trade, indirect)} born in {p.town.name}?", p.doc_id)
            for p in _only_ones(w.people, lambda p: (p.trade, p.town))]


def _ask_instrument(w: _World, indirect: bool) -> list[_Question]:
    players = _only_ones(w.people, lambda p: (p.instrument, p.town) if p.instrument else None)
    return [_Question(f"Which person born in {p.town.name} played the {_say(p.instrument, indirect)}?",
                      p.doc_id) for p in players]


def _ask_landform(w: _World, indirect: bool) -> list[_Question]:
    def text(t: Town) -> str:
        if indirect:
            return f"Which town lies where the {t.river} {t.landform.description}?"
        return f"Which town lies at the {t.landform.word} of the {t.river}?"
    return [_Question(text(t), t.doc_id) for t in w.towns]


def _ask_town_material(w: _World, indirect: bool) -> list[_Question]:
    return [_Question(f"Which town on the {t.river} is known for its {_say(t.material, indirect)}?",
                      t.doc_id) for t in w.towns]


def _ask_company_material(w: _World, indirect: bool) -> list[_Question]:
    return [_Question(f"Which trading house in {c.town.name} deals in {_say(c.material, indirect)}?",
                      c.doc_id) for c in _only_ones(w.companies, lambda c: (c.town, c.material))]


_SHARED_SHAPES = (_ask_trade, _ask_instrument, _ask_landform, _ask_town_material,
                  _ask_company_material)


def _two_hop_pools(w: _World) -> list[list[_Question]]:
    """Questions that name the answer only through a fact stated in another document."""
    unique = _only_ones(w.people, lambda p: (p.trade, p.town))
    seat = {}
    for c in w.companies:
        seat.setdefault(c.town.doc_id, c)
    by_landform = [_Question(
        f"Which {p.trade.word} was born in the town that lies at the {p.town.landform.word} "
        f"of the {p.town.river}?", p.doc_id, p.town.doc_id) for p in unique]
    by_material = [_Question(
        f"Which {p.trade.word} was born in the town on the {p.town.river} that is known for its "
        f"{p.town.material.word}?", p.doc_id, p.town.doc_id) for p in unique]
    by_company_seat = [_Question(
        f"Which {p.trade.word} was born in the town where the trading house "
        f"{seat[p.town.doc_id].name} is based?", p.doc_id, seat[p.town.doc_id].doc_id)
        for p in unique if p.town.doc_id in seat]
    unique_ids = {p.doc_id for p in unique}
    by_founder = [_Question(
        f"Which trading house was founded by the {c.founder.trade.word} born in {c.founder.town.name}?",
        c.doc_id, c.founder.doc_id) for c in w.companies if c.founder.doc_id in unique_ids]
    by_inventor = [_Question(
        f"What did the {i.inventor.trade.word} born in {i.inventor.town.name} invent?",
        i.doc_id, i.inventor.doc_id) for i in w.inventions if i.inventor.doc_id in unique_ids]
    return [by_landform, by_material, by_company_seat, by_founder, by_inventor]


def _take(pools: list[list[_Question]], n: int, taken: set[str], kind: str) -> list[_Question]:
    """n questions, round-robin over the shapes so each kind mixes them evenly, and no
    document answering two questions (so train and test splits cannot share answers)."""
    pools = [list(p) for p in pools]
    picked: list[_Question] = []
    while len(picked) < n:
        before = len(picked)
        for pool in pools:
            while pool and pool[-1].answer in taken:
                pool.pop()
            if pool and len(picked) < n:
                q = pool.pop()
                taken.add(q.answer)
                picked.append(q)
        if len(picked) == before:
            raise ValueError(f"the world is too small for {n} {kind} queries (found {len(picked)}); "
                             "add people, towns or companies, or ask for fewer queries")
    return picked


def _questions(rng, w: _World, n_queries: int) -> dict[str, list[_Question]]:
    n_lex, n_ind, n_hop = (n_queries // 3 + (i < n_queries % 3) for i in range(3))
    lex_pools, ind_pools = [], []
    for shape in _SHARED_SHAPES:
        lex, ind = shape(w, False), shape(w, True)
        order = rng.permutation(len(lex))  # half of each shape's subjects per kind
        lex_pools.append([lex[i] for i in order[0::2]])
        ind_pools.append([ind[i] for i in order[1::2]])
    taken: set[str] = set()
    return {
        "lex": _take(lex_pools, n_lex, taken, "lexical"),
        "ind": _take(ind_pools, n_ind, taken, "indirect"),
        "hop": _take([_shuffled(rng, p) for p in _two_hop_pools(w)], n_hop, taken, "two-hop"),
    }


# --- public API --------------------------------------------------------------------------


def query_kind(query_id: str) -> str:
    """'lexical', 'indirect' or 'two_hop' for a synthetic query id such as 'hop-0007'."""
    return QUERY_KINDS[query_id.split("-", 1)[0]]


def make_synthetic(
    seed: int = 0,
    n_people: int = 2000,
    n_towns: int = 120,
    n_rivers: int = 30,
    n_companies: int = 300,
    n_inventions: int = 300,
    n_notices: int = 250,
    n_queries: int = 600,
) -> RetrievalDataset:
    """The synthetic collection: one document per person, town, river, trading house
    and invention, plus fair notices as distractors (3,000 documents by default), and
    ``n_queries`` queries split evenly over the lexical, indirect and two-hop kinds.

    Qrels grade the answering document 2 and, for two-hop queries, the bridging
    document 1. ``stats`` counts documents per type and queries per kind.
    """
    if not 1 <= n_rivers <= n_towns:
        raise ValueError(f"need 1 <= n_rivers <= n_towns, got {n_rivers} rivers, {n_towns} towns")
    if -(-n_towns // n_rivers) > min(len(LANDFORMS), len(MATERIALS)):
        raise ValueError(f"at most {min(len(LANDFORMS), len(MATERIALS))} towns per river, "
                         f"so that each is named by its landform or material")
    if max(n_companies, n_inventions) > n_people:
        raise ValueError("every trading house and invention needs its own person")

    rng = np.random.default_rng(seed)
    world = _build_world(rng, _Names(rng), n_people, n_towns, n_rivers, n_companies,
                         n_inventions, n_notices)
    asked = _questions(rng, world, n_queries)

    queries, qrels = {}, {}
    for prefix, questions in asked.items():
        for i, q in enumerate(questions):
            qid = f"{prefix}-{i + 1:04d}"
            queries[qid] = q.text
            qrels[qid] = {q.answer: ANSWER_GRADE}
            if q.support:
                qrels[qid][q.support] = SUPPORT_GRADE

    stats = Counter("docs_" + doc_id.split("-")[0] for doc_id in world.documents)
    stats.update("queries_" + QUERY_KINDS[prefix] for prefix, qs in asked.items() for _ in qs)
    stats.update(documents=len(world.documents), queries=len(queries))
    return RetrievalDataset(NAME, world.documents, queries, qrels, stats=dict(stats))
