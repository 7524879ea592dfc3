"""benchmarks/compare_runs.py: two TREC run files through benchmarks/stats.py (tested in test_stats.py)."""

import sys

import pytest

from searchr3_env.trec_run import write_trec_run


@pytest.fixture
def compare(load_script):
    return load_script("benchmarks/compare_runs.py")


def test_the_cli_reads_two_runs_against_the_split_qrels(compare, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "toy"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(f'{{"_id": "d{i}", "title": "", "text": "doc {i}"}}\n' for i in range(4)))
    queries = [f"q{i}" for i in range(20)]
    (folder / "queries.jsonl").write_text("".join(f'{{"_id": "{q}", "text": "query {q}"}}\n' for q in queries))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\td{i % 4}\t1\n" for i, q in enumerate(queries)))
    perfect = {q: {f"d{i % 4}": 1.0, f"d{(i + 1) % 4}": 0.5} for i, q in enumerate(queries)}
    second = {q: {f"d{i % 4}": 0.5, f"d{(i + 1) % 4}": 1.0} for i, q in enumerate(queries)}
    write_trec_run(tmp_path / "a.trec", second, "a")
    write_trec_run(tmp_path / "b.trec", perfect, "b")
    monkeypatch.setattr(sys, "argv", ["compare_runs", "--data", str(folder), "--split", "all",
                                      str(tmp_path / "a.trec"), str(tmp_path / "b.trec"), "--resamples", "500"])
    compare.main()
    out = capsys.readouterr().out
    assert "20 judged all queries" in out
    assert "| mrr@10 | 0.5000 | 1.0000 | +0.5000 | [+0.5000, +0.5000] | 20 / 0 / 0 |" in out
