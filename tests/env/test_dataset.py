"""RetrievalDataset: fingerprints, the deterministic query split, judged queries, validation."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from searchr3_env.dataset import DatasetError, Document, RetrievalDataset

REPO = Path(__file__).resolve().parents[2]


def make(corpus=None, queries=None, qrels=None, name="toy") -> RetrievalDataset:
    corpus = (
        {"d1": Document("Alpha", "first text"), "d2": Document("", "second text"), "d3": Document("Gamma", "")}
        if corpus is None
        else corpus
    )
    queries = {"q1": "alpha", "q2": "second", "q3": "unjudged"} if queries is None else queries
    qrels = {"q1": {"d1": 1, "d3": 0}, "q2": {"d2": 2}} if qrels is None else qrels
    return RetrievalDataset(name, corpus, queries, qrels)


def big(n_queries=400, order=None) -> RetrievalDataset:
    corpus = {f"d{i}": Document(f"t{i}", f"text {i}") for i in range(20)}
    qids = [f"query-{i}" for i in range(n_queries)]
    if order is not None:
        qids = [qids[i] for i in order]
    queries = {q: f"text of {q}" for q in qids}
    # every third query unjudged, every fifth judged only with grade 0
    qrels = {}
    for i, q in enumerate(sorted(qids, key=lambda s: int(s.split("-")[1]))):
        if i % 3 == 0:
            continue
        qrels[q] = {f"d{i % 20}": 0 if i % 5 == 0 else 1 + i % 3}
    return RetrievalDataset("big", corpus, queries, qrels)


# ---------------------------------------------------------------- fingerprints


def test_fingerprints_are_stable_hex_digests_and_equal_for_equal_content():
    a, b = make(), make()
    assert a is not b
    assert a.fingerprint == b.fingerprint == a.fingerprint
    assert a.corpus_fingerprint == b.corpus_fingerprint
    for fp in (a.fingerprint, a.corpus_fingerprint):
        assert len(fp) == 64 and int(fp, 16) >= 0
    assert a.fingerprint != a.corpus_fingerprint


def test_fingerprints_do_not_depend_on_query_or_qrels_insertion_order():
    a = make()
    b = make(
        queries={"q3": "unjudged", "q2": "second", "q1": "alpha"},
        qrels={"q2": {"d2": 2}, "q1": {"d3": 0, "d1": 1}},
    )
    assert a.fingerprint == b.fingerprint


def _corpus_variants():
    base = {"d1": Document("Alpha", "first text"), "d2": Document("", "second text"), "d3": Document("Gamma", "")}
    yield "doc text", base | {"d2": Document("", "second text!")}
    yield "doc title", base | {"d1": Document("alpha", "first text")}
    yield "title/text boundary", base | {"d1": Document("Alph", "afirst text")}
    yield "title moved to text", base | {"d3": Document("", "Gamma")}
    yield "extra doc", base | {"d4": Document("", "x")}
    yield "doc id", {("d1" if k != "d3" else "d3b"): v for k, v in base.items()}
    yield "removed doc", {k: v for k, v in base.items() if k != "d2"}
    yield "id/title boundary", {"d": Document("1Alpha", "first text"), **{k: v for k, v in base.items() if k != "d1"}}


@pytest.mark.parametrize("what,corpus", list(_corpus_variants()), ids=[w for w, _ in _corpus_variants()])
def test_any_document_change_changes_both_fingerprints(what, corpus):
    base = make(qrels={})
    other = make(corpus=corpus, qrels={})
    assert other.corpus_fingerprint != base.corpus_fingerprint, what
    assert other.fingerprint != base.fingerprint, what


@pytest.mark.parametrize(
    "what,kwargs",
    [
        ("query text", {"queries": {"q1": "alpha", "q2": "second!", "q3": "unjudged"}}),
        ("query id", {"queries": {"q1": "alpha", "q2": "second", "q4": "unjudged"}}),
        ("extra query", {"queries": {"q1": "alpha", "q2": "second", "q3": "unjudged", "q4": "x"}}),
        ("grade", {"qrels": {"q1": {"d1": 2, "d3": 0}, "q2": {"d2": 2}}}),
        ("judged doc", {"qrels": {"q1": {"d2": 1, "d3": 0}, "q2": {"d2": 2}}}),
        ("grade-0 row added", {"qrels": {"q1": {"d1": 1, "d3": 0}, "q2": {"d2": 2, "d1": 0}}}),
        ("qrel removed", {"qrels": {"q1": {"d1": 1}, "q2": {"d2": 2}}}),
        ("judged query", {"qrels": {"q1": {"d1": 1, "d3": 0}, "q3": {"d2": 2}}}),
    ],
)
def test_query_or_qrel_changes_change_fingerprint_but_not_corpus_fingerprint(what, kwargs):
    base, other = make(), make(**kwargs)
    assert other.fingerprint != base.fingerprint, what
    assert other.corpus_fingerprint == base.corpus_fingerprint, what


def test_corpus_fingerprint_ignores_queries_qrels_name_and_split():
    a = make()
    b = make(queries={"x": "y"}, qrels={}, name="other")
    assert a.corpus_fingerprint == b.corpus_fingerprint
    ds = big()
    assert ds.split("train").corpus_fingerprint == ds.split("test").corpus_fingerprint == ds.corpus_fingerprint
    assert ds.split("train").fingerprint != ds.split("test").fingerprint != ds.fingerprint


def test_fingerprint_is_unambiguous_for_query_texts_with_newlines():
    a = make(queries={"q1": "alpha\nq\tq2\tsecond"}, qrels={"q1": {"d1": 1}})
    b = make(queries={"q1": "alpha", "q2": "second"}, qrels={"q1": {"d1": 1}})
    assert a.queries != b.queries
    assert a.fingerprint != b.fingerprint
    c = make(queries={"q\t1": "x"}, qrels={})
    d = make(queries={"q": "1\tx"}, qrels={})
    assert c.fingerprint != d.fingerprint


# ---------------------------------------------------------------- judged queries


def test_judged_query_ids_exclude_unjudged_and_grade0_only_queries_in_file_order():
    ds = RetrievalDataset(
        "j",
        {"a": Document("", "x"), "b": Document("", "y")},
        {"z": "1", "unjudged": "2", "zero": "3", "a1": "4", "neg": "5", "mixed": "6"},
        {"a1": {"a": 3}, "zero": {"a": 0, "b": 0}, "z": {"b": 1}, "neg": {"a": -1}, "mixed": {"a": 0, "b": 2}},
    )
    assert ds.judged_query_ids == ["z", "a1", "mixed"]
    assert ds.relevant("mixed") == {"b": 2}
    assert ds.relevant("zero") == {} and ds.relevant("unjudged") == {}
    # unjudged queries remain part of the collection
    assert set(ds.queries) == {"z", "unjudged", "zero", "a1", "neg", "mixed"}


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"corpus": {}}, "corpus"),
        ({"queries": {}, "qrels": {}}, "quer"),
        ({"qrels": {"nope": {"d1": 1}}}, "nope"),
        ({"qrels": {"q1": {"ghost": 1}}}, "ghost"),
    ],
)
def test_invalid_collections_are_refused(kwargs, needle):
    with pytest.raises(DatasetError, match=needle):
        make(**kwargs)


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


# ---------------------------------------------------------------- split


def test_split_partitions_queries_and_judged_queries():
    ds = big()
    train, test = ds.split("train"), ds.split("test")
    assert ds.split("all") is ds
    assert set(train.queries).isdisjoint(test.queries)
    assert set(train.queries) | set(test.queries) == set(ds.queries)
    assert set(train.judged_query_ids).isdisjoint(test.judged_query_ids)
    assert set(train.judged_query_ids) | set(test.judged_query_ids) == set(ds.judged_query_ids)
    for part, name in ((train, "train"), (test, "test")):
        assert part.split_name == name
        assert part.corpus is ds.corpus  # shared, so one index serves both
        assert all(part.queries[q] == ds.queries[q] for q in part.queries)
        assert set(part.qrels) <= set(part.queries)
        assert all(part.qrels[q] == ds.qrels[q] for q in part.qrels)
        assert {q for q in ds.qrels if q in part.queries} == set(part.qrels)
    # roughly half and half (binomial, n=400: sd=10)
    assert 140 < len(test.queries) < 260


def test_split_does_not_depend_on_insertion_order_or_collection_content():
    order = list(range(400))
    random.Random(7).shuffle(order)
    a, b = big(), big(order=order)
    for name in ("train", "test"):
        assert set(a.split(name).queries) == set(b.split(name).queries)
    # a query's side depends only on its id: a sub-collection agrees with the full one
    sub = big(n_queries=50)
    assert set(sub.split("test").queries) == {q for q in a.split("test").queries if q in sub.queries}


def test_split_test_fraction_is_respected():
    ds = big(n_queries=400)
    assert 40 < len(ds.split("test", test_fraction=0.2).queries) < 120
    small = set(ds.split("test", test_fraction=0.2).queries)
    large = set(ds.split("test", test_fraction=0.6).queries)
    assert small <= large  # monotone in the fraction for a fixed id


def test_split_is_stable_across_processes_and_hash_seeds():
    code = (
        "from searchr3_env.dataset import RetrievalDataset, Document\n"
        "q = {f'query-{i}': 'x' for i in range(200)}\n"
        "ds = RetrievalDataset('s', {'d': Document('', 'x')}, q, {})\n"
        "print(','.join(sorted(ds.split('test').queries)))\n"
    )
    outs = set()
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        outs.add(res.stdout.strip())
    assert len(outs) == 1
    q = {f"query-{i}": "x" for i in range(200)}
    here = RetrievalDataset("s", {"d": Document("", "x")}, q, {})
    assert outs.pop() == ",".join(sorted(here.split("test").queries))


def test_split_rejects_unknown_name_and_empty_side():
    ds = big()
    with pytest.raises(ValueError, match="split"):
        ds.split("dev")
    one = make(queries={"only": "x"}, qrels={})
    sides = []
    for name in ("train", "test"):
        try:
            sides.append(len(one.split(name).queries))
        except DatasetError as err:
            assert "no queries" in str(err)
            sides.append(0)
    assert sorted(sides) == [0, 1]


def test_document_as_text_joins_title_and_text():
    assert Document("T", "body").as_text() == "T\nbody"
    assert Document("", "body").as_text() == "body"
    assert Document("T", "").as_text() == "T"
    assert Document("", "").as_text() == ""
    ds = make()
    assert ds.doc_ids == ["d1", "d2", "d3"]
    assert ds.document_texts() == ["Alpha\nfirst text", "second text", "Gamma"]
    assert ds.document_texts(["d3", "d1"]) == ["Gamma", "Alpha\nfirst text"]
