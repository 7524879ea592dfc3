"""The SFT stage on a tiny random Llama: checkpoints, exact resume after a kill, pseudo-queries, the CLI."""

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from agents.checkpoint import CheckpointError, resolve_checkpoint
from agents.cli import main
from agents.config import SFTConfig
from agents.policy import base_encoder_name, build_embedder, load_agent
from agents.queries import body_excerpt, pseudo_queries
from agents.sft import choose_reasoning, finished_thought, train
from searchr3_env import load_beir

LOSS_KEYS = ("loss", "loss_lm", "loss_kl", "loss_nce", "loss_triplet", "grad_norm")


def tiny_config(tiny_beir, tiny_model_dir, run_dir, **overrides) -> SFTConfig:
    settings = dict(data=str(tiny_beir), model=str(tiny_model_dir), output_dir=str(run_dir), max_steps=6,
                    batch_size=4, hard_negatives=2, mine_depth=5, val_queries=2, checkpoint_every=2, lr=1e-3,
                    warmup_steps=2, cache_dir=str(Path(run_dir).parent / "cache"), progress=False)
    return SFTConfig(**{**settings, **overrides})


def losses(run_dir) -> dict[int, dict]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in LOSS_KEYS} for r in records if "loss" in r}


@pytest.fixture(scope="module")
def finished_run(tiny_beir, tiny_model_dir, tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    cfg = tiny_config(tiny_beir, tiny_model_dir, tmp_path_factory.mktemp("sft") / "run")
    return cfg, train(cfg)


def test_a_run_writes_checkpoints_metrics_and_a_plot(finished_run):
    cfg, checkpoint = finished_run
    run = Path(cfg.output_dir)
    assert checkpoint == run / "checkpoints" / "step-000006"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000006"]  # keeps 2
    assert (run / "metrics.png").stat().st_size > 1000
    logged = losses(run)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(v) for record in logged.values() for v in record.values())
    assert logged[1]["loss_kl"] == 0.0  # LoRA starts at the base model
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_val_ndcg@10" in line]
    assert [e["step"] for e in evals] == [0, 6]


def test_resume_after_a_kill_repeats_the_uninterrupted_losses(finished_run, train_until_killed, tmp_path):
    reference_cfg, _ = finished_run
    cfg = SFTConfig(**{**asdict(reference_cfg), "output_dir": str(tmp_path / "killed")})
    train_until_killed("agents.sft", cfg, step=3, key="loss")  # the last checkpoint is step 2
    assert resolve_checkpoint(cfg.output_dir).name == "step-000002"
    assert 3 in losses(cfg.output_dir)
    train(cfg)
    assert losses(cfg.output_dir) == losses(reference_cfg.output_dir)


def test_resume_refuses_other_settings(finished_run):
    cfg, _ = finished_run
    with pytest.raises(ValueError, match="other settings.*lr"):
        train(SFTConfig(**{**asdict(cfg), "lr": 0.5}))


def test_init_continues_from_a_checkpoint_with_its_own_negatives(finished_run, tmp_path):
    reference_cfg, _ = finished_run
    cfg = SFTConfig(**{**asdict(reference_cfg), "output_dir": str(tmp_path / "next"), "max_steps": 1,
                       "init": reference_cfg.output_dir})
    train(cfg)
    evals = {r["step"]: r["eval_val_ndcg@10"] for r in map(json.loads, Path(cfg.output_dir, "metrics.jsonl").open())
             if "eval_val_ndcg@10" in r}
    before = {r["step"]: r["eval_val_ndcg@10"] for r in map(json.loads, Path(reference_cfg.output_dir, "metrics.jsonl").open())
              if "eval_val_ndcg@10" in r}
    assert evals[0] == pytest.approx(before[6], abs=1e-9)  # step 0 is the init checkpoint, not the base model
    assert losses(cfg.output_dir)[1]["loss_kl"] > 0.0  # already away from the base model (the KL reference)
    with pytest.raises(ValueError, match="lora_rank: 16 there, 8 here"):
        train(SFTConfig(**{**asdict(cfg), "output_dir": str(tmp_path / "other"), "lora_rank": 8}))


def test_gradient_checkpointing_changes_memory_not_losses_and_may_change_on_resume(finished_run, tmp_path):
    reference_cfg, _ = finished_run
    cfg = SFTConfig(**{**asdict(reference_cfg), "output_dir": str(tmp_path / "gc"), "max_steps": 2,
                       "gradient_checkpointing": True})  # steps 1-2 are warm-up: same lr as the 6-step run
    train(cfg)
    checkpointed, plain = losses(cfg.output_dir), losses(reference_cfg.output_dir)
    for step in (1, 2):
        for key in LOSS_KEYS:
            assert checkpointed[step][key] == pytest.approx(plain[step][key], rel=1e-4, abs=1e-6), (step, key)
    train(SFTConfig(**{**asdict(cfg), "gradient_checkpointing": False}))  # resumes: the numbers do not depend on it


def test_checkpoint_loads_as_a_versioned_encoder_with_frozen_base_documents(finished_run):
    cfg, checkpoint = finished_run
    agent, documents = load_agent(cfg.output_dir)
    assert agent.version == 6 and agent.name.startswith("llm-") and agent.name != documents.name
    assert documents.version == 0 and documents.name == agent.name.rsplit("-", 1)[0]
    texts = ["boundary layer flow", "shock wave"]
    assert not np.allclose(agent.encode_queries(texts), documents.encode_queries(texts), atol=1e-4)
    again, _ = load_agent(checkpoint)
    np.testing.assert_array_equal(again.encode_queries(texts), agent.encode_queries(texts))
    with pytest.raises(CheckpointError, match="missing"):
        resolve_checkpoint(Path(cfg.output_dir) / "checkpoints")


def test_pseudo_queries_fill_up_scarce_qrels(tiny_beir, tiny_model_dir, tmp_path, caplog):
    dataset = load_beir(tiny_beir)
    assert pseudo_queries(dataset, 0, np.random.default_rng(0)) == []
    pairs = pseudo_queries(dataset, 6, np.random.default_rng(0))
    assert len(pairs) == 6
    for query, doc_id, positive in pairs:
        doc = dataset.corpus[doc_id]
        excerpt = query in doc.text and query != doc.text and positive == doc.as_text()
        assert (query == doc.title and positive == doc.text) or excerpt
    cfg = tiny_config(tiny_beir, tiny_model_dir, tmp_path / "run", max_steps=1, min_pairs=200, val_queries=0,
                      train_documents=True, negatives="hashing")
    with caplog.at_level(logging.INFO, logger="agents.queries"):
        train(cfg)
    assert "corpus pseudo-queries (qrels scarce" in caplog.text


def test_a_lowercase_run_embeds_case_folded_and_caches_its_index_apart(tiny_model_dir, tmp_path):
    cfg = SFTConfig(data="synthetic", model=str(tiny_model_dir), cache_dir=str(tmp_path), lowercase=True)
    embedder = build_embedder(cfg)
    assert embedder.lowercase and embedder.name == base_encoder_name(cfg.model, cfg.max_doc_tokens, False) + "-lc"


def test_body_excerpt_is_a_sentence_or_a_span_never_the_whole_body():
    rng = np.random.default_rng(0)
    body = "Shock waves form at the leading edge. The boundary layer separates behind them. Short one."
    for _ in range(20):
        assert body_excerpt(body, rng) in ("Shock waves form at the leading edge.",
                                           "The boundary layer separates behind them.")
    unpunctuated = "two new equations for the design of filters are presented for designing constant k sections"
    for _ in range(20):  # NPL: one unpunctuated sentence per document
        span = body_excerpt(unpunctuated, rng)
        assert span in unpunctuated and 5 <= len(span.split()) <= 8
    ten_words = "this single sentence has ten words and nothing else here"  # the shortest body that is cropped
    for _ in range(5):
        span = body_excerpt(ten_words, rng)
        assert span in ten_words and len(span.split()) == 5
    assert body_excerpt("too short to split", rng) is None and body_excerpt("", rng) is None


def test_cli_full_fine_tuning_with_trained_documents_then_eval(tiny_beir, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sft", "--data", str(tiny_beir), "--model", str(tiny_model_dir), "--output-dir", str(run),
                 "--max-steps", "2", "--batch-size", "4", "--hard-negatives", "2", "--mine-depth", "5",
                 "--val-queries", "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                 "--no-lora", "--train-documents", "--negatives", "hashing"]) == 0
    assert "final checkpoint" in capsys.readouterr().out
    for extra in ([], ["--reasoning", "4"]):
        assert main(["eval", "--data", str(tiny_beir), "--encoder", f"llm:{run}", "--json", "--no-progress",
                     "--cache-dir", str(tmp_path / "cache"), *extra]) == 0
        reported = json.loads(capsys.readouterr().out)
        assert reported["split"] == "test" and 0.0 <= reported["ndcg@10"] <= 1.0
    assert reported["agent"] == f"llm:{run}+reasoning4"
    for extra in ([], ["--lowercase"]):
        assert main(["eval", "--data", str(tiny_beir), "--encoder", f"llm:{tiny_model_dir}", "--json", "--no-progress",
                     "--no-cache", *extra]) == 0
    capsys.readouterr()
    assert main(["eval", "--data", str(tiny_beir), "--encoder", f"llm:{run}", "--lowercase", "--no-cache"]) == 2
    assert "keeps the setting it was trained with" in capsys.readouterr().err  # a checkpoint's case is fixed
    with pytest.raises(SystemExit):
        main(["eval", "--encoder", "bm25"])


def test_finished_thought_cuts_back_to_the_last_finished_sentence(tiny_embedder):
    tok, embed_id = tiny_embedder.tokenizer, tiny_embedder.embed_id
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    two = ids("the wing. the shock")
    assert tok.decode(finished_thought(two, tok, embed_id)) == "the wing."
    assert tok.decode(finished_thought(ids("the wing\nthe shock"), tok, embed_id)) == "the wing\n"
    assert finished_thought(ids("the boundary layer flow"), tok, embed_id) == []  # no finished sentence
    emitted = ids("the wing") + [embed_id]
    assert finished_thought(emitted, tok, embed_id) == emitted  # the model ended it itself


def test_chosen_reasoning_is_the_option_that_retrieves_its_positive_best(tiny_embedder, monkeypatch):
    import torch

    import agents.sft
    from agents.losses import info_nce

    # A random tiny model never finishes a sentence, so keep its raw samples: the choice is what is under test.
    samples = []
    monkeypatch.setattr(agents.sft, "finished_thought", lambda tokens, *_: samples.append(tokens) or tokens)
    cfg = SFTConfig(data="synthetic", reasoning_tokens=6, reasoning_samples=3, nce_temperature=0.05)
    texts = ["boundary layer flow", "shock wave on a wing", "buckling of shells"]
    torch.manual_seed(1)
    docs = torch.nn.functional.normalize(torch.randn(6, tiny_embedder.dim), dim=-1)
    exclude = torch.zeros(3, 6, dtype=torch.bool)
    exclude[0, 4] = True  # document 4 is also relevant to query 0: never its negative
    chosen, stats = choose_reasoning(tiny_embedder, cfg, texts, docs, exclude, seed=0)

    def loss(reasoning):
        with torch.no_grad():
            emb = tiny_embedder.forward(tiny_embedder.query_sequences(texts, reasoning)).embeddings
            return info_nce(emb, docs, torch.arange(3), 0.05, exclude, reduction="none")

    options = [[[]] + samples[i * 3 : (i + 1) * 3] for i in range(3)]  # option 0: no reasoning
    per_option = torch.stack([loss([row[k] for row in options]) for k in range(4)], 1)  # (queries, options)
    best = per_option.argmin(1).tolist()
    assert chosen == [row[k] for row, k in zip(options, best)]
    assert any(k > 0 for k in best) and any(len(r) > 0 for r in chosen)  # the test exercises real choices
    assert stats["reasoning_len"].item() == pytest.approx(np.mean([len(r) for r in chosen]))
    assert stats["reasoning_kept"].item() == pytest.approx(np.mean([k > 0 for k in best]))
    samples.clear()
    again, _ = choose_reasoning(tiny_embedder, cfg, texts, docs, exclude, seed=0)
    assert again == chosen  # seeded: a resumed run draws the same reasonings


def test_self_taught_reasoning_trains_on_its_chosen_reasoning_and_resumes_exactly(
        tiny_beir, tiny_model_dir, tmp_path, train_until_killed):
    cfg = tiny_config(tiny_beir, tiny_model_dir, tmp_path / "run", max_steps=3, checkpoint_every=1,
                      reasoning_tokens=4, reasoning_samples=2)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(0 <= r["reasoning_len"] <= 4 and "embed_emitted" in r for r in steps)
    killed = SFTConfig(**{**asdict(cfg), "output_dir": str(tmp_path / "killed")})
    train_until_killed("agents.sft", killed, step=2, key="loss")
    train(killed)
    assert losses(killed.output_dir) == losses(cfg.output_dir)
    with pytest.raises(ValueError, match="reasoning_samples"):
        SFTConfig(data="synthetic", reasoning_tokens=4, reasoning_samples=0)


def test_lora_trains_the_embed_token_row_so_the_model_can_learn_to_emit_it(finished_run):
    from safetensors.torch import load_file

    from agents.checkpoint import WEIGHTS

    cfg, checkpoint = finished_run
    rows = {k: v for k, v in load_file(checkpoint / WEIGHTS).items() if "trainable_tokens" in k}
    assert len(rows) == 1  # one row: the input and output embeddings are tied
    base = build_embedder(cfg)
    start = base.model.get_input_embeddings().weight[base.embed_id]
    trained = next(iter(rows.values()))[0]
    assert trained.shape == start.shape and not np.allclose(trained.numpy(), start.detach().numpy(), atol=1e-5)
    agent, _ = load_agent(checkpoint)
    merged = agent.model.merge_and_unload().get_output_embeddings().weight[agent.embed_id]
    np.testing.assert_allclose(merged.numpy(), trained.numpy())  # what generation scores the embed token with


def test_answer_probabilities_script_scores_the_fixed_answer(load_script, finished_run):
    module = load_script("benchmarks/answer_probabilities.py")
    cfg, _ = finished_run
    tokens, probs = module.answer_probabilities(cfg.output_dir, cfg.data, 3)
    assert tokens[-1] == "<|embed_token|>" and len(probs) == 3
    assert all(len(p) == len(tokens) and all(0.0 < x <= 1.0 for x in p) for p in probs)


def test_the_embed_token_row_trains_at_its_own_learning_rate(tiny_beir, tiny_model_dir, tmp_path):
    from agents.layout import Layout
    from agents.policy import build_optimizer, make_trainable

    cfg = tiny_config(tiny_beir, tiny_model_dir, tmp_path / "run")
    embedder = build_embedder(cfg)
    make_trainable(embedder, Layout.of_sft(cfg))
    rest, row = build_optimizer(embedder.model, 1e-3, 0.0, embed_token_lr_scale=10.0).param_groups
    assert rest["lr"] == 1e-3 and row["lr"] == pytest.approx(1e-2)
    assert [tuple(p.shape) for p in row["params"]] == [(1, embedder.model.config.hidden_size)]
    assert all(p.requires_grad for p in rest["params"]) and len(rest["params"]) > 1

    frozen_row = build_embedder(cfg)
    make_trainable(frozen_row, Layout.of_sft(tiny_config(tiny_beir, tiny_model_dir, tmp_path / "run", train_embed_token=False)))
    (only,) = build_optimizer(frozen_row.model, 1e-3, 0.0, embed_token_lr_scale=10.0).param_groups
    assert only["lr"] == 1e-3
