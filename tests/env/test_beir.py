"""load_beir: the real collections in shared/data, and broken files refused with file and line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from searchr3_env.beir import load_beir
from searchr3_env.dataset import DatasetError, RetrievalDataset

# From shared/data/README.md: docs, queries, judged queries, qrels rows.
EXPECTED = {
    "npl": (11_429, 93, 93, 2_083),
    "cranfield": (1_400, 225, 225, 1_612),
    "cacm": (3_204, 64, 52, 796),
}


@pytest.fixture(scope="module")
def real(shared_data):
    out = {}
    for name in EXPECTED:
        folder = shared_data / name
        if not (folder / "corpus.jsonl").is_file():
            pytest.skip(f"{folder} has no corpus.jsonl (collection absent)")
        out[name] = load_beir(folder)
    return out


# ---------------------------------------------------------------- real collections


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_collection_counts_match_the_readme(real, name):
    ds = real[name]
    docs, queries, judged, rows = EXPECTED[name]
    assert isinstance(ds, RetrievalDataset)
    assert ds.name == name and ds.split_name == "all"
    assert len(ds.corpus) == docs
    assert len(ds.queries) == queries
    assert len(ds.judged_query_ids) == judged
    assert sum(len(j) for j in ds.qrels.values()) == rows
    assert all(g >= 1 for j in ds.qrels.values() for g in j.values())
    assert ds.stats == {"dropped_qrels_unknown_query": 0, "dropped_qrels_unknown_document": 0}


def test_real_collection_details(real):
    # README: NPL has no titles, CACM has 1,617 title-only documents, Cranfield 2 empty documents.
    assert all(d.title == "" for d in real["npl"].corpus.values())
    assert sum(1 for d in real["cacm"].corpus.values() if d.title and not d.text) == 1_617
    empty = [i for i, d in real["cranfield"].corpus.items() if not d.title and not d.text]
    assert sorted(empty) == ["471", "995"]
    assert set(real["cranfield"].queries) == {str(i) for i in range(1, 226)}
    assert max(g for j in real["cranfield"].qrels.values() for g in j.values()) == 4


def test_real_collection_split(shared_data, real):
    full = real["cacm"]
    train = load_beir(shared_data / "cacm", split="train")
    test = load_beir(shared_data / "cacm", split="test")
    assert train.split_name == "train" and test.split_name == "test"
    assert set(train.queries).isdisjoint(test.queries)
    assert set(train.queries) | set(test.queries) == set(full.queries)
    assert sorted(train.judged_query_ids + test.judged_query_ids) == sorted(full.judged_query_ids)
    assert train.corpus_fingerprint == test.corpus_fingerprint == full.corpus_fingerprint
    assert set(test.queries) == set(full.split("test").queries)


# ---------------------------------------------------------------- synthetic folders

CORPUS = [
    {"_id": "d1", "title": "Alpha", "text": "first"},
    {"_id": "d2", "title": "", "text": "second"},
    {"_id": "d3", "text": "no title field"},
]
QUERIES = [{"_id": "q1", "text": "alpha"}, {"_id": "q2", "text": "second"}, {"_id": "q3", "text": "unjudged"}]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\td3\t0\n"


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write(folder: Path, corpus=None, queries=None, qrels=None, qrels_name="test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    for fname, content, default in (
        ("corpus.jsonl", corpus, jsonl(CORPUS)),
        ("queries.jsonl", queries, jsonl(QUERIES)),
        (f"qrels/{qrels_name}.tsv", qrels, QRELS),
    ):
        if content is not False:
            (folder / fname).write_text(default if content is None else content, encoding="utf-8")
    return folder


def test_valid_folder_loads(tmp_path):
    ds = load_beir(write(tmp_path / "mini"))
    assert ds.name == "mini"
    assert list(ds.corpus) == ["d1", "d2", "d3"]
    assert ds.corpus["d1"].title == "Alpha" and ds.corpus["d1"].text == "first"
    assert ds.corpus["d3"].title == "" and ds.corpus["d3"].text == "no title field"
    assert ds.queries == {"q1": "alpha", "q2": "second", "q3": "unjudged"}
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}}
    assert ds.judged_query_ids == ["q1", "q2"]
    assert load_beir(tmp_path / "mini", name="renamed").name == "renamed"


def test_header_is_optional_and_blank_lines_are_tolerated(tmp_path):
    ref = load_beir(write(tmp_path / "ref"))
    blank = write(
        tmp_path / "blank",
        corpus="\n" + jsonl(CORPUS[:1]) + "  \n\n" + jsonl(CORPUS[1:]) + "\n",
        queries=jsonl(QUERIES[:2]) + "\n\t\n" + jsonl(QUERIES[2:]),
        qrels="query-id\tcorpus-id\tscore\n\nq1\td1\t1\n\nq2\td2\t2\nq2\td3\t0\n\n",
    )
    noheader = write(tmp_path / "noheader", qrels="q1\td1\t1\nq2\td2\t2\nq2\td3\t0")  # no final newline
    crlf = write(
        tmp_path / "crlf",
        corpus=jsonl(CORPUS).replace("\n", "\r\n"),
        qrels=QRELS.replace("\n", "\r\n"),
    )
    for folder in (blank, noheader, crlf):
        ds = load_beir(folder)
        assert ds.corpus == ref.corpus and ds.queries == ref.queries and ds.qrels == ref.qrels, folder.name
        assert ds.corpus_fingerprint == ref.corpus_fingerprint


def test_other_qrels_file_name(tmp_path):
    folder = write(tmp_path / "m", qrels_name="dev", qrels="q3\td1\t1\n")
    ds = load_beir(folder, qrels_file="dev")
    assert ds.qrels == {"q3": {"d1": 1}}
    with pytest.raises(DatasetError, match=r"test\.tsv"):
        load_beir(folder)


def test_split_argument(tmp_path):
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(60)]
    qrels = "".join(f"q{i}\td{1 + i % 3}\t1\n" for i in range(0, 60, 2))
    folder = write(tmp_path / "s", queries=jsonl(queries), qrels=qrels)
    full = load_beir(folder)
    parts = {name: load_beir(folder, split=name) for name in ("train", "test")}
    assert set(parts["train"].queries) | set(parts["test"].queries) == set(full.queries)
    assert set(parts["train"].queries).isdisjoint(parts["test"].queries)
    for name, part in parts.items():
        assert part.split_name == name
        assert set(part.queries) == set(full.split(name).queries)
        assert part.qrels == {q: j for q, j in full.qrels.items() if q in part.queries}
    with pytest.raises(ValueError, match="split"):
        load_beir(folder, split="validation")


# ---------------------------------------------------------------- broken files

GOOD_DOC = json.dumps({"_id": "d9", "title": "", "text": "x"})


def corpus_with(bad_line: str, at: int = 3) -> str:
    """The good corpus with ``bad_line`` as physical line ``at`` (a blank line before it)."""
    lines = [json.dumps(r) for r in CORPUS[:1]] + [""] + [bad_line] + [json.dumps(r) for r in CORPUS[1:]]
    assert lines[at - 1] == bad_line
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "bad,needle",
    [
        ('{"_id": "d9", "text": "unterminated}', "JSON"),
        ("not json at all", "JSON"),
        ('["d9", "x"]', "object"),
        ('"just a string"', "object"),
        ("42", "object"),
        ('{"title": "t", "text": "no id"}', "_id"),
        ('{"_id": 7, "text": "int id"}', "_id"),
        ('{"_id": null, "text": "null id"}', "_id"),
        ('{"_id": "", "text": "empty id"}', "_id"),
        ('{"_id": "d9", "title": 5, "text": "x"}', "title"),
        ('{"_id": "d9", "title": ["a"], "text": "x"}', "title"),
        ('{"_id": "d9", "title": "", "text": {"a": 1}}', "text"),
    ],
)
def test_bad_corpus_line_names_file_and_line(tmp_path, bad, needle):
    folder = write(tmp_path / "b", corpus=corpus_with(bad))
    with pytest.raises(DatasetError) as err:
        load_beir(folder)
    msg = str(err.value)
    assert f"{folder / 'corpus.jsonl'}:3" in msg
    assert needle in msg


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("{broken", "JSON"),
        ("[1, 2]", "object"),
        ('{"text": "no id"}', "_id"),
        ('{"_id": 3, "text": "x"}', "_id"),
        ('{"_id": "q9", "text": 3}', "text"),
    ],
)
def test_bad_queries_line_names_file_and_line(tmp_path, bad, needle):
    text = jsonl(QUERIES[:2]) + bad + "\n" + jsonl(QUERIES[2:])
    folder = write(tmp_path / "b", queries=text)
    with pytest.raises(DatasetError) as err:
        load_beir(folder)
    assert f"{folder / 'queries.jsonl'}:3" in str(err.value)
    assert needle in str(err.value)


def test_query_without_text_field_gives_dataset_error_or_empty_text(tmp_path):
    folder = write(tmp_path / "b", queries=jsonl(QUERIES) + '{"_id": "q4"}\n')
    try:
        ds = load_beir(folder)
    except DatasetError as err:
        assert f"{folder / 'queries.jsonl'}:4" in str(err)
    else:
        assert ds.queries["q4"] == ""


def test_duplicate_id_names_both_lines(tmp_path):
    dup = json.dumps({"_id": "d1", "title": "again", "text": "dup"})
    folder = write(tmp_path / "b", corpus=corpus_with(dup))
    with pytest.raises(DatasetError) as err:
        load_beir(folder)
    msg = str(err.value)
    assert f"{folder / 'corpus.jsonl'}:3" in msg
    assert "'d1'" in msg and "line 1" in msg
    qfolder = write(tmp_path / "q", queries=jsonl(QUERIES) + "\n" + json.dumps({"_id": "q2", "text": "x"}) + "\n")
    with pytest.raises(DatasetError) as err:
        load_beir(qfolder)
    assert f"{qfolder / 'queries.jsonl'}:5" in str(err.value) and "line 2" in str(err.value)


@pytest.mark.parametrize(
    "qrels,line,needle",
    [
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\n", 3, "columns"),
        ("q1\td1\t1\n\nq2\td2\t1\textra\n", 3, "columns"),
        ("q1 d1 1\n", 1, "columns"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t1.5\n", 2, "integer"),
        ("q1\td1\tyes\n", 1, "integer"),
        ("q1\td1\t\n", 1, "integer"),
        ("q1\td1\t1\nq2\td2\t1\nq1\td1\t2\n", 3, "duplicate"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nquery-id\tcorpus-id\tscore\n", 3, "integer"),
    ],
)
def test_bad_qrels_row_names_file_and_line(tmp_path, qrels, line, needle):
    folder = write(tmp_path / "b", qrels=qrels)
    with pytest.raises(DatasetError) as err:
        load_beir(folder)
    assert f"{folder / 'qrels' / 'test.tsv'}:{line}" in str(err.value)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "kwargs,fname",
    [
        ({"corpus": ""}, "corpus.jsonl"),
        ({"corpus": "\n\n  \n"}, "corpus.jsonl"),
        ({"queries": ""}, "queries.jsonl"),
        ({"qrels": ""}, "test.tsv"),
        ({"qrels": "query-id\tcorpus-id\tscore\n"}, "test.tsv"),
    ],
)
def test_empty_files_are_refused_naming_the_file(tmp_path, kwargs, fname):
    folder = write(tmp_path / "b", **kwargs)
    with pytest.raises(DatasetError, match=r"no .*(records|rows)") as err:
        load_beir(folder)
    assert fname in str(err.value) and str(folder) in str(err.value)


@pytest.mark.parametrize("missing", ["corpus", "queries", "qrels"])
def test_missing_files_are_refused_naming_the_file(tmp_path, missing):
    folder = write(tmp_path / "b", **{missing: False})
    with pytest.raises(DatasetError, match="not found") as err:
        load_beir(folder)
    expected = {"corpus": "corpus.jsonl", "queries": "queries.jsonl", "qrels": "test.tsv"}[missing]
    assert expected in str(err.value)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        load_beir(tmp_path / "nowhere")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        load_beir(tmp_path / "afile")


# ---------------------------------------------------------------- unknown ids in qrels

UNKNOWN_QRELS = (
    "query-id\tcorpus-id\tscore\n"  # 1
    "q1\td1\t1\n"  # 2
    "qX\td1\t1\n"  # 3 unknown query
    "q2\tdX\t1\n"  # 4 unknown document
    "\n"  # 5
    "qY\tdY\t1\n"  # 6 unknown query (and document)
    "q2\td2\t1\n"  # 7
    "q3\tdZ\t2\n"  # 8 unknown document
    "q1\tdW\t0\n"  # 9 unknown document
)


def test_unknown_qrels_are_dropped_with_a_counting_warning(tmp_path, caplog):
    folder = write(tmp_path / "u", qrels=UNKNOWN_QRELS)
    with caplog.at_level(logging.WARNING, logger="searchr3_env.beir"):
        ds = load_beir(folder)
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert ds.judged_query_ids == ["q1", "q2"]
    assert ds.stats == {"dropped_qrels_unknown_query": 2, "dropped_qrels_unknown_document": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    q_msg = next(m for m in warnings if "unknown query" in m)
    d_msg = next(m for m in warnings if "unknown document" in m)
    assert " 2 " in q_msg and "line 3" in q_msg and "test.tsv" in q_msg
    assert " 3 " in d_msg and "line 4" in d_msg and "test.tsv" in d_msg
    # the counts survive a split
    assert load_beir(folder, split="train").stats == ds.stats


def test_no_warning_when_nothing_is_dropped(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="searchr3_env.beir"):
        ds = load_beir(write(tmp_path / "ok"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert ds.stats == {"dropped_qrels_unknown_query": 0, "dropped_qrels_unknown_document": 0}


@pytest.mark.parametrize(
    "qrels,line,bad",
    [
        ("q1\td1\t1\nqX\td1\t1\n", 2, "qX"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\n\nq2\tdX\t1\n", 4, "dX"),
    ],
)
def test_unknown_qrels_refused_when_strict(tmp_path, qrels, line, bad):
    folder = write(tmp_path / "s", qrels=qrels)
    with pytest.raises(DatasetError) as err:
        load_beir(folder, strict=True)
    assert f"{folder / 'qrels' / 'test.tsv'}:{line}" in str(err.value)
    assert repr(bad) in str(err.value) or bad in str(err.value)
    assert load_beir(folder).stats != {"dropped_qrels_unknown_query": 0, "dropped_qrels_unknown_document": 0}


# ---------------------------------------------------------------- byte-order marks and encodings

BOM = "\ufeff"


@pytest.mark.parametrize(
    "files",
    [
        {"corpus": BOM + jsonl(CORPUS)},
        {"queries": BOM + jsonl(QUERIES)},
        {"qrels": BOM + QRELS},
        {"qrels": BOM + QRELS.split("\n", 1)[1]},  # no header: the mark sits on the first judgement's query id
    ],
    ids=["corpus", "queries", "qrels-header", "qrels-no-header"],
)
def test_a_bom_at_the_start_of_a_file_is_dropped(tmp_path, files):
    ref = load_beir(write(tmp_path / "ref"))
    ds = load_beir(write(tmp_path / "bom", **files), strict=True)
    assert ds.corpus == ref.corpus and ds.queries == ref.queries and ds.qrels == ref.qrels


def test_a_bom_is_dropped_at_the_start_of_a_line_of_concatenated_files(tmp_path):
    ref = load_beir(write(tmp_path / "ref"))
    rows = QRELS.split("\n", 1)[1].splitlines(keepends=True)
    folder = write(
        tmp_path / "cat",
        corpus=BOM + jsonl(CORPUS[:2]) + BOM + jsonl(CORPUS[2:]),
        queries=jsonl(QUERIES[:1]) + BOM + jsonl(QUERIES[1:]),
        qrels=BOM + "query-id\tcorpus-id\tscore\n" + rows[0] + BOM + "".join(rows[1:]),
    )
    ds = load_beir(folder, strict=True)
    assert ds.corpus == ref.corpus and ds.queries == ref.queries and ds.qrels == ref.qrels


def _encoding_error(folder: Path, fname: str) -> str:
    with pytest.raises(DatasetError) as err:
        load_beir(folder)
    msg = str(err.value)
    assert str(folder / fname) in msg
    assert "UTF-8" in msg and "iconv" in msg
    return msg


@pytest.mark.parametrize(
    "fname,text,line",
    [
        ("corpus.jsonl", jsonl(CORPUS[:2]) + '{"_id": "d3", "text": "caf\u00e9"}\n', 3),
        ("qrels/test.tsv", QRELS + "q1\td\u00e9\t1\n", 5),
    ],
)
def test_latin1_files_are_refused_naming_line_and_byte_offset(tmp_path, fname, text, line):
    folder = write(tmp_path / "l")
    (folder / fname).write_bytes(text.encode("latin-1"))
    msg = _encoding_error(folder, fname)
    offset = text.encode("latin-1").index(b"\xe9")
    assert f"{fname}:{line}:" in msg and f"offset {offset}" in msg and "0xe9" in msg
    assert "iconv -f latin1 -t utf-8" in msg


def test_utf16_files_are_refused_as_utf16(tmp_path):
    folder = write(tmp_path / "u")
    (folder / "queries.jsonl").write_bytes(jsonl(QUERIES).encode("utf-16"))  # with its byte-order mark
    msg = _encoding_error(folder, "queries.jsonl")
    assert "queries.jsonl:1:" in msg and "offset 0" in msg and "UTF-16" in msg
    assert "iconv -f utf-16 -t utf-8" in msg
    (folder / "queries.jsonl").write_bytes(jsonl(QUERIES).encode("utf-16-le"))  # no mark: NUL bytes give it away
    msg = _encoding_error(folder, "queries.jsonl")
    assert "queries.jsonl:1:" in msg and "offset 1" in msg and "UTF-16" in msg
