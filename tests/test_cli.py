"""The searchr3 command line on the synthetic collection and a real BEIR folder."""

import json

import pytest

from agents.cli import main
from searchr3_env import load_beir, read_trec_run
from searchr3_env.metrics import evaluate_run


def test_demo_prints_one_table_per_agent(capsys):
    assert main(["demo", "--agents", "random,hashing", "--no-progress", "--no-cache"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| synthetic")]
    assert [line.split("|")[4].strip() for line in lines] == ["random", "hashing"]
    ndcg = [float(line.split("|")[5]) for line in lines]
    assert ndcg[1] > ndcg[0] + 0.3  # lexical matching beats random vectors by far


def test_eval_json_and_run_file_agree(tmp_path, capsys, shared_data):
    run_path = tmp_path / "run.trec"
    data = str(shared_data / "cranfield")
    assert main(["eval", "--data", data, "--encoder", "hashing", "--json", "--run-out", str(run_path),
                 "--no-progress", "--no-cache"]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert reported["collection"] == "cranfield" and reported["split"] == "test"
    assert set(reported) >= {"ndcg@10", "recall@100", "mrr@10", "map"}
    # The run file alone reproduces the printed metrics.
    recomputed = evaluate_run(read_trec_run(run_path), load_beir(data, split="test").qrels).mean
    for key, value in recomputed.items():
        assert reported[key] == pytest.approx(value, abs=1e-12)
