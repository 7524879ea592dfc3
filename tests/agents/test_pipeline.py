"""The main job (``searchr3 demo``) and ``searchr3 rl`` end to end on a tiny random Llama."""

import json

import pytest

from agents.cli import main
from agents.config import PipelineConfig
from agents.pipeline import subset
from searchr3_env import load_beir
from searchr3_env.records import read_records

AGENTS = ["hashing", "base", "sft", "sft+reasoning3", "sft+grpo+reasoning3"]


def test_demo_runs_every_stage_and_prints_the_before_after_table(tiny_beir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data", str(tiny_beir), "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--train-queries", "8",
                 "--test-queries", "6", "--corpus-docs", "30", "--max-doc-tokens", "16", "--sft-steps", "2",
                 "--sft-batch", "4", "--sft-hard-negatives", "2", "--grpo-steps", "2", "--queries-per-step", "2",
                 "--group-size", "2", "--reasoning-tokens", "3"]) == 0
    table = capsys.readouterr().out
    for agent in AGENTS:
        assert f"| {agent} " in table
    results = json.loads((out / "results.json").read_text())
    assert [r["agent"] for r in results["rows"]] == AGENTS
    assert all(r["queries"] == results["rows"][0]["queries"] > 0 for r in results["rows"])  # same test queries
    assert (out / "grpo" / "metrics.png").is_file() and (out / "sft" / "metrics.png").is_file()
    # Every row has its per-query record, and a record's mean is the table's number.
    records = {r.metadata["agent"]: r for r in read_records(out / "records")}
    assert sorted(records) == sorted(f"demo:{a}" for a in AGENTS)
    for row in results["rows"]:
        assert records[f"demo:{row['agent']}"].mean["ndcg@10"] == pytest.approx(row["ndcg@10"], abs=1e-12)
    assert records["demo:sft"].metadata["checkpoint"]["digest"]  # trained rows name the weights they measured

    # `searchr3 rl` continues from the demo's SFT run.
    assert main(["rl", "--data", str(next((out / "data").iterdir())), "--init", str(out / "sft"), "--output-dir",
                 str(tmp_path / "rl"), "--max-steps", "1", "--queries-per-step", "2", "--group-size", "2",
                 "--reasoning-tokens", "2", "--val-queries", "0", "--no-progress"]) == 0
    assert "final checkpoint" in capsys.readouterr().out


def test_subset_keeps_the_split_and_every_judged_document(tiny_beir):
    full = load_beir(tiny_beir)
    small = subset(full, PipelineConfig(data=str(tiny_beir), train_queries=4, test_queries=3, corpus_docs=30))
    assert len(small.split("train").judged_query_ids) == 4 and len(small.split("test").judged_query_ids) == 3
    assert len(small.corpus) == 30
    assert all(d in small.corpus for judged in small.qrels.values() for d in judged)

