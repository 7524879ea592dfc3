"""The ir_datasets adapter, against a stand-in module (the real one downloads)."""

import sys
import types
from collections import namedtuple

import pytest

from searchr3_env.ir_datasets_adapter import load_ir_datasets

Doc = namedtuple("Doc", "doc_id title text")
Query = namedtuple("Query", "query_id text")
Qrel = namedtuple("Qrel", "query_id doc_id relevance iteration")


class FakeCollection:
    def has_docs(self):
        return True

    has_queries = has_qrels = has_docs

    def docs_iter(self):
        return iter([Doc("d1", "T1", "body one"), Doc("d2", "", "body two")])

    def queries_iter(self):
        return iter([Query("q1", "first"), Query("q2", "second")])

    def qrels_iter(self):
        return iter([Qrel("q1", "d1", 2, "0"), Qrel("q2", "d2", 0, "0")])


def test_converts_docs_queries_and_graded_qrels(monkeypatch):
    fake = types.SimpleNamespace(load=lambda dataset_id: FakeCollection())
    monkeypatch.setitem(sys.modules, "ir_datasets", fake)
    ds = load_ir_datasets("fake/collection")
    assert ds.name == "fake/collection"
    assert ds.corpus["d1"].title == "T1" and ds.corpus["d2"].text == "body two"
    assert ds.qrels == {"q1": {"d1": 2}, "q2": {"d2": 0}}
    assert ds.judged_query_ids == ["q1"]


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ir_datasets", None)
    with pytest.raises(ImportError, match=r"searchr3\[irds\]"):
        load_ir_datasets("beir/scifact/test")
