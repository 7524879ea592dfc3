"""The synthetic collection: deterministic, well-formed, and hard in the intended way."""

import math
import re
from collections import defaultdict

import numpy as np
import pytest

from searchr3_env.synthetic import LEXICON, QUERY_KINDS, make_synthetic, query_kind

STOPWORDS = set(
    "a an the of in on at to and or for by with from who which what where was is that its it "
    "he she his her did".split()
)


@pytest.fixture(scope="module")
def ds():
    return make_synthetic()


def tokens(text):
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS]


def lexical_top1(ds):
    """query id -> best doc id under idf-weighted bag-of-words overlap (no stemming)."""
    ids = ds.doc_ids
    postings = defaultdict(list)
    for i, text in enumerate(ds.document_texts()):
        for w in set(tokens(text)):
            postings[w].append(i)
    idf = {w: math.log(len(ids) / len(p)) for w, p in postings.items()}
    top = {}
    for qid, text in ds.queries.items():
        scores = np.zeros(len(ids))
        for w in set(tokens(text)):
            if w in postings:
                scores[postings[w]] += idf[w]
        top[qid] = ids[int(np.argmax(scores))]
    return top


def by_kind(ds):
    kinds = defaultdict(list)
    for qid in ds.queries:
        kinds[query_kind(qid)].append(qid)
    return kinds


def test_same_seed_same_fingerprint_other_seed_other(ds):
    assert make_synthetic(seed=0).fingerprint == ds.fingerprint
    assert make_synthetic(seed=1).fingerprint != ds.fingerprint


def test_default_sizes_and_stats(ds):
    assert len(ds.corpus) == ds.stats["documents"] == 3000
    assert len(ds.queries) == ds.stats["queries"] == 600
    assert ds.stats["docs_person"] == 2000
    for kind, qids in by_kind(ds).items():
        assert ds.stats[f"queries_{kind}"] == len(qids) == 200
    assert set(by_kind(ds)) == set(QUERY_KINDS.values())


def test_documents_are_titled_ascii(ds):
    for doc in ds.corpus.values():
        assert doc.title and doc.text
        assert (doc.title + doc.text).isascii()
    assert all(text.isascii() for text in ds.queries.values())
    assert len(set(ds.queries.values())) == len(ds.queries)


def test_every_query_has_existing_relevant_docs(ds):
    assert ds.judged_query_ids == list(ds.queries)
    answers = []
    for qid in ds.queries:
        relevant = ds.relevant(qid)
        assert relevant and all(d in ds.corpus for d in relevant)
        answers += [d for d, g in relevant.items() if g == 2]
    assert len(answers) == len(set(answers)) == len(ds.queries), "each query has its own answer"


def test_two_hop_queries_grade_answer_2_and_bridge_1(ds):
    for qid in by_kind(ds)["two_hop"]:
        assert sorted(ds.qrels[qid].values()) == [1, 2]
    for qid in by_kind(ds)["lexical"] + by_kind(ds)["indirect"]:
        assert list(ds.qrels[qid].values()) == [2]


def test_descriptions_avoid_every_term():
    words = [t.word for t in LEXICON]
    assert len(LEXICON) >= 40 and len(set(words)) == len(words)
    for term in LEXICON:
        assert not any(w in term.description.lower() for w in words), term


def test_indirect_queries_describe_the_term_their_document_uses(ds):
    for qid in by_kind(ds)["indirect"]:
        query = ds.queries[qid].lower()
        assert not any(t.word in query for t in LEXICON), query
        described = [t for t in LEXICON if t.description.lower() in query]
        assert len(described) == 1, query
        (answer,) = ds.relevant(qid)
        assert described[0].word in ds.corpus[answer].text


def test_lexical_matcher_finds_lexical_queries_but_not_the_others(ds):
    top = lexical_top1(ds)
    accuracy = {
        kind: np.mean([ds.qrels[q].get(top[q], 0) == 2 for q in qids])
        for kind, qids in by_kind(ds).items()
    }
    assert accuracy["lexical"] >= 0.8, accuracy
    assert accuracy["indirect"] <= accuracy["lexical"] - 0.4, accuracy
    assert accuracy["two_hop"] <= accuracy["lexical"] - 0.4, accuracy


def test_small_world_and_its_limits():
    small = make_synthetic(seed=3, n_people=300, n_towns=20, n_rivers=5, n_companies=40,
                           n_inventions=40, n_notices=20, n_queries=60)
    assert len(small.corpus) == 300 + 20 + 5 + 40 + 40 + 20
    assert len(small.queries) == 60
    with pytest.raises(ValueError, match="too small"):
        make_synthetic(n_people=300, n_towns=20, n_rivers=5, n_companies=40,
                       n_inventions=40, n_notices=20, n_queries=3000)
    with pytest.raises(ValueError, match="towns per river"):
        make_synthetic(n_towns=100, n_rivers=10)
