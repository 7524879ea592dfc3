"""Metrics: hand-computed cases, and agreement with pytrec_eval (trec_eval) on real runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from searchr3_env.beir import load_beir
from searchr3_env.encoders import HashingEncoder
from searchr3_env.metrics import (
    average_precision,
    dcg,
    evaluate_run,
    ndcg,
    parse_metric,
    precision,
    rank_documents,
    recall,
    reciprocal_rank,
)
from searchr3_env.trec_run import RunFileError, read_trec_run, write_trec_run

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
COLLECTIONS = ("npl", "cranfield", "cacm")
ALL_METRICS = ("ndcg@10", "ndcg", "recall@100", "p@10", "map", "map@100", "mrr@10", "mrr")
inf = math.inf


def disc(rank: int) -> float:
    return 1 / math.log2(rank + 1)


# ---------------------------------------------------------------- rank primitives


def test_ndcg_uses_linear_graded_gain_and_cuts_ideal_at_k():
    ideal = 3 + 2 * disc(2)
    assert dcg([1, 3], [3, 2]) == pytest.approx(3 + 2 * disc(3))
    assert ndcg([1, 3], [3, 2]) == pytest.approx((3 + 2 * disc(3)) / ideal)
    assert ndcg([1, 3], [3, 2], k=2) == pytest.approx(3 / ideal)
    assert ndcg([1, 3], [3, 2], k=1) == pytest.approx(1.0)
    assert ndcg([inf, 2], [3, 1]) == pytest.approx(disc(2) / (3 + disc(2)))
    assert ndcg([5, 6], [1, 1], k=4) == 0.0
    assert ndcg([], []) == 0.0


def test_set_metrics_and_cutoffs():
    ranks = [2, 5, inf]
    assert recall(ranks, 4, k=2) == pytest.approx(1 / 4)
    assert recall(ranks, 4, k=5) == pytest.approx(2 / 4)
    assert recall(ranks, 4, k=None) == pytest.approx(2 / 4)
    assert precision(ranks, k=10) == pytest.approx(2 / 10)
    assert reciprocal_rank(ranks) == pytest.approx(1 / 2)
    assert reciprocal_rank(ranks, k=1) == 0.0
    assert reciprocal_rank([inf, inf]) == 0.0
    assert average_precision(ranks, 4) == pytest.approx((1 / 2 + 2 / 5) / 4)
    assert average_precision(ranks, 4, k=4) == pytest.approx((1 / 2) / 4)


def test_average_precision_stays_in_range_for_pessimistic_tied_ranks():
    # Two relevant documents tied at ranks 1-2 both get the pessimistic rank 2.
    assert average_precision([2, 2], 2) == pytest.approx((1 / 2 + 2 / 2) / 2)


def test_batch_rows_equal_single_queries():
    rng = np.random.default_rng(0)
    n_rel = np.array([3, 1, 0, 5])
    ranks = np.full((4, 5), np.inf)
    grades = np.zeros((4, 5), dtype=int)
    for row, n in enumerate(n_rel):
        ranks[row, :n] = rng.choice(np.r_[1:30, [np.inf] * 5], size=n, replace=False)
        grades[row, :n] = rng.integers(1, 4, size=n)
    checks = [
        (lambda r, g, n: ndcg(r, g, k=10)),
        (lambda r, g, n: dcg(r, g)),
        (lambda r, g, n: recall(r, n, k=20)),
        (lambda r, g, n: precision(r, k=5)),
        (lambda r, g, n: reciprocal_rank(r, k=10)),
        (lambda r, g, n: average_precision(r, n)),
    ]
    for metric in checks:
        batch = metric(ranks, grades, n_rel)
        assert batch.shape == (4,)
        singles = [metric(ranks[i, : n_rel[i]], grades[i, : n_rel[i]], n_rel[i]) for i in range(4)]
        np.testing.assert_allclose(batch, singles)
    assert np.all(ndcg(ranks, grades)[n_rel == 0] == 0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ndcg([0, 1], [1, 1]), "1-based"),
        (lambda: recall([np.nan], 1, k=1), "1-based"),
        (lambda: ndcg([1, 2], [1]), "shape of ranks"),
        (lambda: ndcg([1], [-1]), ">= 0"),
        (lambda: recall([1, 2], 1, k=5), "n_relevant"),
        (lambda: average_precision([[1], [2]], [1, 1, 1]), "n_relevant"),
        (lambda: reciprocal_rank([1], k=0), "k must be"),
        (lambda: precision([1], k=None), "cut-off"),
    ],
)
def test_primitives_refuse_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- evaluate_run, hand-computed


def pytrec_per_query(run, qrels, metrics):
    """pytrec_eval's scores under our metric names; judged queries missing from the run score 0 (-c)."""
    standard = {}
    for name in metrics:
        family, k = parse_metric(name)
        if family != "mrr":
            base = {"ndcg": "ndcg_cut", "recall": "recall", "map": "map_cut", "p": "P"}[family]
            standard[name] = f"{base}.{k}" if k else family
    scores = pytrec_eval.RelevanceEvaluator(qrels, set(standard.values())).evaluate(run)
    out = {q: {n: scores[q][m.replace(".", "_")] for n, m in standard.items()} for q in scores}
    for name in metrics:
        family, k = parse_metric(name)
        if family == "mrr":
            cut = {q: {d: docs[d] for d in rank_documents(docs)[:k]} for q, docs in run.items()}
            for q, s in pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut).items():
                out[q][name] = s["recip_rank"]
    judged = [q for q, j in qrels.items() if any(g > 0 for g in j.values())]
    return {q: out.get(q, dict.fromkeys(metrics, 0.0)) for q in judged}


def assert_matches_pytrec(run, qrels, metrics):
    result = evaluate_run(run, qrels, metrics)
    expected = pytrec_per_query(run, qrels, metrics)
    assert result.per_query.keys() == expected.keys()
    for qid, scores in expected.items():
        assert result.per_query[qid] == pytest.approx(scores, abs=1e-6), qid
    means = {m: float(np.mean([s[m] for s in expected.values()])) for m in metrics}
    assert result.mean == pytest.approx(means, abs=1e-6)


QRELS = {"q1": {"a": 2, "b": 1, "z": 0}, "q2": {"c": 1}, "q3": {"a": 0}}
RUN = {
    "q1": {"a": 0.5, "b": 0.9, "c": 0.9, "z": 1.0},  # ranked z, c, b, a: the tie goes to the greater id
    "q3": {"a": 1.0},  # judged, but nothing relevant: not scored
    "q4": {"a": 1.0},  # not judged at all: ignored
}  # q2 is judged and missing: scores 0 and counts in the mean


def test_evaluate_run_hand_computed():
    metrics = ("ndcg@10", "ndcg@3", "mrr@10", "mrr@2", "recall@3", "p@4", "map", "map@3")
    result = evaluate_run(RUN, QRELS, metrics)
    ideal = 2 + disc(2)
    q1 = {
        "ndcg@10": (2 * disc(4) + disc(3)) / ideal,
        "ndcg@3": disc(3) / ideal,
        "mrr@10": 1 / 3,
        "mrr@2": 0.0,
        "recall@3": 1 / 2,
        "p@4": 2 / 4,
        "map": (1 / 3 + 2 / 4) / 2,
        "map@3": (1 / 3) / 2,
    }
    assert result.per_query.keys() == {"q1", "q2"}
    assert result.per_query["q1"] == pytest.approx(q1)
    assert result.per_query["q2"] == dict.fromkeys(metrics, 0.0)
    assert result.mean == pytest.approx({m: v / 2 for m, v in q1.items()})
    assert_matches_pytrec(RUN, QRELS, metrics)


def test_ties_break_by_descending_doc_id_like_trec_eval():
    run = {"q": {"9": 1.0, "10": 1.0, "100": 1.0, "8": 0.5}}
    assert rank_documents(run["q"]) == ["9", "100", "10", "8"]
    assert evaluate_run(run, {"q": {"10": 1}}, "mrr").mean == {"mrr": pytest.approx(1 / 3)}
    assert_matches_pytrec(run, {"q": {"10": 1, "8": 2}}, ALL_METRICS)


@pytest.mark.parametrize("bad", ["bleu", "recall", "p", "ndcg@0", "ndcg@", "map@x", "P@10", "mrr@-1"])
def test_unknown_metric_names_the_metric_and_the_valid_forms(bad):
    with pytest.raises(ValueError, match=rf"{bad!r}.*ndcg@k, recall@k, mrr, mrr@k, map, map@k, p@k"):
        evaluate_run(RUN, QRELS, ("ndcg@10", bad))


def test_no_judged_query_is_an_error():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_run(RUN, {"q3": {"a": 0}})


# ---------------------------------------------------------------- agreement with pytrec_eval on real runs


@pytest.fixture(scope="module", params=COLLECTIONS)
def real_runs(request):
    """(qrels, exact run, run rounded to 2 decimals) of hashing-encoder retrieval, top 1,000 per query."""
    if not (DATA / request.param).is_dir():
        pytest.skip(f"{DATA / request.param} not found: real-collection checks need ../shared/data beside the repo")
    ds = load_beir(DATA / request.param)
    texts = ds.document_texts()
    encoder = HashingEncoder().fit(texts)
    scores = (encoder.encode_queries(list(ds.queries.values())) @ encoder.encode_documents(texts).T).astype(np.float64)
    top = np.argpartition(-scores, 999, axis=1)[:, :1000]
    doc_ids = ds.doc_ids
    exact, rounded = {}, {}
    for row, qid in enumerate(ds.queries):  # every query, unjudged ones too
        ids = [doc_ids[i] for i in top[row]]
        exact[qid] = dict(zip(ids, scores[row, top[row]].tolist()))
        rounded[qid] = dict(zip(ids, np.round(scores[row, top[row]], 2).tolist()))
    qrels = {q: dict(j) for q, j in ds.qrels.items()}
    return qrels, exact, rounded


def test_real_runs_match_pytrec_eval(real_runs):
    qrels, exact, rounded = real_runs
    distinct = np.mean([len(set(docs.values())) / len(docs) for docs in rounded.values()])
    assert distinct < 0.1, "rounding should leave many tied scores"
    for run in (exact, rounded):
        assert_matches_pytrec(run, qrels, ALL_METRICS)


# ---------------------------------------------------------------- TREC run files


def test_trec_run_round_trip(tmp_path):
    run = {
        "q2": {"d1": 1 / 3, "d2": 1 / 3, "d10": -1e-300, "d3": 1e300, "d4": 0.1 + 0.2},
        "q1": {"x": 1.0},
    }
    path = write_trec_run(tmp_path / "run.trec", run, tag="hashing")
    lines = path.read_text().splitlines()
    assert lines[0].split() == ["q2", "Q0", "d3", "1", "1e+300", "hashing"]
    assert [line.split()[2] for line in lines[:5]] == rank_documents(run["q2"])
    assert [line.split()[3] for line in lines] == ["1", "2", "3", "4", "5", "1"]
    assert read_trec_run(path) == run
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    "line, message",
    [
        ("q1 Q0 d2 2 0.5", "expected 6 fields"),
        ("q1 Q0 d2 2 0.5 tag extra", "expected 6 fields"),
        ("q1 Q0 d2 two 0.5 tag", "rank 'two' is not an integer"),
        ("q1 Q0 d2 2 high tag", "score 'high' is not a number"),
        ("q1 Q0 d2 2 nan tag", "NaN"),
        ("q1 Q0 d1 2 0.5 tag", "'d1' appears twice"),
    ],
)
def test_read_trec_run_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.trec"
    path.write_text(f"q1 Q0 d1 1 0.9 tag\n\n{line}\n")
    with pytest.raises(RunFileError, match=rf"bad\.trec:3: .*{message}"):
        read_trec_run(path)


@pytest.mark.parametrize(
    "run, tag",
    [({"q1": {"d1": 1.0, "d2": float("nan")}}, "t"), ({"q1": {"d 1": 1.0}}, "t"), ({"q1": {"d1": 1.0}}, "my tag")],
)
def test_failed_write_keeps_the_old_file(tmp_path, run, tag):
    path = tmp_path / "run.trec"
    path.write_text("old\n")
    with pytest.raises(ValueError):
        write_trec_run(path, run, tag)
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]
