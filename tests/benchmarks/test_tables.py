"""benchmarks/tables.py: tables from records with known answers, the protocol's refusals, and the committed tables."""

import json

import numpy as np
import pytest

from searchr3_env.metrics import RunEvaluation
from searchr3_env.records import read_records, write_record

QUERIES = [f"q{i:03d}" for i in range(200)]


@pytest.fixture
def tables(load_script):
    return load_script("benchmarks/tables.py")


def write(folder, agent, scores, seed=None, collection="toy", fingerprint="f" * 64, split="test", **extra):
    per_query = {q: {"ndcg@10": float(s), "recall@100": float(s)} for q, s in zip(QUERIES, scores)}
    mean = {m: float(np.mean([v[m] for v in per_query.values()])) for m in ("ndcg@10", "recall@100")}
    name = f"{collection}-{split}-{agent}-{seed}.json"
    meta = {"agent": agent, "collection": collection, "fingerprint": fingerprint, "split": split, "depth": 1000,
            "seed": seed, "command": f"make-{agent}", **extra}
    return write_record(folder / name, RunEvaluation(mean, per_query), meta)


def test_a_planted_effect_is_found_and_a_null_is_not(tables, tmp_path):
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 1, len(QUERIES))
    write(tmp_path, "hashing", difficulty)
    write(tmp_path, "same", difficulty + rng.normal(0, 0.1, len(QUERIES)))
    for seed, offset in enumerate((-0.01, 0.0, 0.01)):  # three training seeds around a planted +0.1
        write(tmp_path, "better", difficulty + 0.1 + offset + rng.normal(0, 0.1, len(QUERIES)), seed=seed)
    write(tmp_path, "dev-only", difficulty + 0.5, split="train")  # development records never reach a table
    table = tables.configurations(tables.check_protocol(read_records(tmp_path)))
    assert list(table["toy"]) == ["hashing", "better", "same"]
    stats = tables.comparisons(table, ["ndcg@10"], resamples=2000)
    better, p_better = stats["toy", "better", "ndcg@10"]
    same, p_same = stats["toy", "same", "ndcg@10"]
    assert better.low < 0.1 < better.high and p_better < 0.01
    assert same.low < 0 < same.high and p_same > 0.05
    text = tables.retrieval_headline(table, stats, [], tmp_path / "RESULTS.md")
    rows = {line.split(" | ")[1].split("]")[0].lstrip("["): line for line in text.splitlines()[2:] if "toy" in line}
    assert "200 × 3" in rows["better"] and "**+0.0" in rows["better"]  # bold: significant after Holm
    assert "**" not in rows["same"] and "reference" in rows["hashing"]


def test_the_protocol_refuses_a_test_record_without_its_command(tables, tmp_path):
    record = write(tmp_path, "hashing", np.ones(len(QUERIES)))
    body = json.loads(record.path.read_text())
    body["metadata"]["command"] = ""
    record.path.write_text(json.dumps(body))
    with pytest.raises(tables.ProtocolError, match="must say the command"):
        tables.check_protocol(read_records(tmp_path))


def test_a_second_test_record_of_one_configuration_needs_the_first_marked_superseded(tables, tmp_path):
    first = write(tmp_path / "a", "minilm", np.ones(len(QUERIES)))
    write(tmp_path / "b", "minilm", np.zeros(len(QUERIES)))
    with pytest.raises(tables.ProtocolError, match=r"a/toy-test-minilm-None\.json and .*b/toy-test-minilm-None\.json"):
        tables.check_protocol(read_records(tmp_path))
    body = json.loads(first.path.read_text())
    body["metadata"]["superseded"] = "re-run after the tokenizer fix"
    first.path.write_text(json.dumps(body))
    [live] = tables.check_protocol(read_records(tmp_path))
    assert live.mean["ndcg@10"] == 0.0


def test_one_collection_name_with_two_contents_is_refused(tables, tmp_path):
    write(tmp_path, "hashing", np.ones(len(QUERIES)))
    write(tmp_path, "minilm", np.ones(len(QUERIES)), fingerprint="e" * 64)
    with pytest.raises(tables.ProtocolError, match="2 different contents"):
        tables.check_protocol(read_records(tmp_path))


def test_blocks_are_replaced_idempotently_and_a_missing_block_is_named(tables, tmp_path):
    page = tmp_path / "page.md"
    text = "intro\n<!-- tables:x begin -->\nold\n<!-- tables:x end -->\nrest\n"
    once = tables.replace_block(text, "x", "| a |", page)
    assert once == "intro\n<!-- tables:x begin -->\n| a |\n<!-- tables:x end -->\nrest\n"
    assert tables.replace_block(once, "x", "| a |", page) == once
    with pytest.raises(ValueError, match=r"page\.md: no '<!-- tables:y begin -->'"):
        tables.replace_block(text, "y", "", page)


def test_baseline_records_writes_one_record_per_agent_and_seed(load_script, tmp_path):
    folder = tmp_path / "toy"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(f'{{"_id": "d{i}", "title": "", "text": "doc {i} topic{i % 4}"}}\n'
                                                 for i in range(12)))
    (folder / "queries.jsonl").write_text("".join(f'{{"_id": "q{i}", "text": "topic{i % 4}"}}\n' for i in range(16)))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i % 4}\t1\n"
                                                                                      for i in range(16)))
    baseline = load_script("benchmarks/baseline_records.py")
    paths = baseline.main(["--data", str(folder), "--agents", "random", "hashing", "--seeds", "0", "1",
                           "--out", str(tmp_path / "records"), "--cache-dir", str(tmp_path / "cache")])
    assert [p.name for p in paths] == ["toy-test-random-seed0.json", "toy-test-random-seed1.json",
                                       "toy-test-hashing.json"]
    records = read_records(tmp_path / "records")
    assert {(r.metadata["agent"], r.metadata["seed"]) for r in records} == {("random", 0), ("random", 1),
                                                                            ("hashing", None)}
    assert all("baseline_records.py" in r.metadata["command"] for r in records)


def test_committed_tables_are_what_the_committed_records_give(tables):
    assert tables.main(["--check"]) == 0, "run: .venv/bin/python benchmarks/tables.py"
