"""Per-query records: every judged query survives the round trip, and a bad file is refused naming file and field."""

import json

import pytest

from searchr3_env import Document, RetrievalDataset
from searchr3_env.encoders import HashingEncoder
from searchr3_env.evaluation import evaluate_pair
from searchr3_env.records import (
    RecordError,
    read_records,
    record_metadata,
    record_path_beside,
    write_record,
)


@pytest.fixture(scope="module")
def dataset():
    corpus = {f"d{i}": Document(f"title {i}", f"text about topic{i % 5} and item{i}") for i in range(30)}
    queries = {f"q{i}": f"topic{i % 5} item{i}" for i in range(8)} | {"q_empty": ""}
    qrels = {q: {f"d{i}": 2, f"d{(i + 5) % 30}": 1} for i, q in enumerate(queries)}
    return RetrievalDataset("toy", corpus, queries, qrels)


@pytest.fixture(scope="module")
def evaluation(dataset):
    encoder = HashingEncoder().fit(dataset.document_texts())
    return evaluate_pair("hashing", encoder, encoder, dataset, split="all", depth=30, progress=False)[1]


def test_round_trip_keeps_every_judged_query_and_the_metadata(dataset, evaluation, tmp_path):
    path = record_path_beside(tmp_path / "run.trec")
    assert path == tmp_path / "run.record.json"
    written = write_record(path, evaluation, record_metadata(dataset, agent="hashing", split="all", depth=30))
    [record] = read_records(tmp_path)
    assert record.per_query == evaluation.metrics.per_query == written.per_query
    assert record.per_query["q_empty"] == {m: 0.0 for m in record.metrics}  # a zero-vector query is kept, at 0
    assert record.mean == pytest.approx(evaluation.metrics.mean)
    meta = record.metadata
    assert (meta["agent"], meta["collection"], meta["split"], meta["depth"], meta["turns"], meta["seed"]) == (
        "hashing", "toy", "all", 30, 1, None)
    assert meta["fingerprint"] == dataset.fingerprint and meta["command"] and meta["date"]
    assert json.loads(path.read_text())["unranked"] == ["q_empty"]


def test_checkpoint_is_named_by_its_bytes(dataset, evaluation, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    meta = record_metadata(dataset, agent="sft", split="all", depth=30, seed=3, checkpoint=checkpoint)
    first = write_record(tmp_path / "a.json", evaluation, meta).metadata["checkpoint"]["digest"]
    (checkpoint / "model.safetensors").write_bytes(b"other weights")
    meta = record_metadata(dataset, agent="sft", split="all", depth=30, seed=3, checkpoint=checkpoint)
    assert write_record(tmp_path / "b.json", evaluation, meta).metadata["checkpoint"]["digest"] != first
    with pytest.raises(FileNotFoundError, match="missing"):
        record_metadata(dataset, agent="sft", split="all", depth=30, checkpoint=tmp_path / "missing")


def test_a_run_evaluation_is_accepted_too_and_metadata_must_identify_the_run(dataset, evaluation, tmp_path):
    meta = record_metadata(dataset, agent="hashing", split="all", depth=30)
    assert write_record(tmp_path / "r.json", evaluation.metrics, meta).per_query == evaluation.metrics.per_query
    with pytest.raises(RecordError, match=r"r\.json: field 'metadata.agent' is missing"):
        write_record(tmp_path / "r.json", evaluation, {**meta, "agent": ""})
    with pytest.raises(TypeError, match="AgentEvaluation"):
        write_record(tmp_path / "r.json", {"q": {"ndcg@10": 1.0}}, meta)


@pytest.mark.parametrize("edit, field", [
    (lambda b: b.pop("format"), "format"),
    (lambda b: b["metadata"].pop("fingerprint"), "metadata.fingerprint"),
    (lambda b: b["metadata"].update(split="dev"), "metadata.split"),
    (lambda b: b["metadata"].update(seed="0"), "metadata.seed"),
    (lambda b: b["per_query"]["q1"].pop("map"), "per_query.q1"),
    (lambda b: b["per_query"]["q2"].update(map="NaN"), "per_query.q2.map"),
    (lambda b: b.update(per_query={}), "per_query"),
])
def test_a_bad_record_is_refused_naming_file_and_field(dataset, evaluation, tmp_path, edit, field):
    path = tmp_path / "bad.json"
    write_record(path, evaluation, record_metadata(dataset, agent="hashing", split="all", depth=30))
    body = json.loads(path.read_text())
    edit(body)
    path.write_text(json.dumps(body))
    with pytest.raises(RecordError, match=rf"bad\.json: field '{field}'"):
        read_records(path)


def test_unreadable_or_unmatched_inputs_are_errors(tmp_path):
    (tmp_path / "torn.json").write_text('{"format": ')
    with pytest.raises(RecordError, match=r"torn\.json: malformed JSON"):
        read_records(tmp_path / "*.json")
    with pytest.raises(RecordError, match="no record file matches"):
        read_records(tmp_path / "nothing-*.json")
