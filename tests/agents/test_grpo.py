"""The GRPO stage on a tiny random Llama: reward improves, documents refresh, exact resume after a kill, the CLI."""

import json
import shutil
from types import SimpleNamespace
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.checkpoint import resumable_checkpoint
from agents.cli import main
from agents.config import GRPOConfig, SFTConfig
from agents.grpo import contrastive_targets, train
from agents.policy import load_agent
from agents.queries import query_collection
from agents.rollouts import format_reward, group_advantages
from agents.sft import train as train_sft
from searchr3_env.beir import load_beir

TIMING = ("generate_s", "env_s", "update_s", "step_s", "peak_mem_mb")


def records(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.fixture(scope="module")
def sft_run(tiny_beir, tiny_model_dir, tmp_path_factory):
    """A 4-step SFT run that trains documents, so GRPO refreshes the env index with the policy."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("grpo")
    cfg = SFTConfig(data=str(tiny_beir), model=str(tiny_model_dir), output_dir=str(root / "sft"), max_steps=4,
                    batch_size=4, hard_negatives=2, mine_depth=5, val_queries=0, lr=1e-3, warmup_steps=1,
                    train_documents=True, cache_dir=str(root / "cache"), progress=False)
    train_sft(cfg)
    return root


def grpo_config(tiny_beir, sft_run, run_dir, **overrides) -> GRPOConfig:
    # Every train-split query (12) in every step, so the reward curve measures learning, not query draws.
    settings = dict(data=str(tiny_beir), init=str(sft_run / "sft"), output_dir=str(run_dir), queries_per_step=12,
                    group_size=4, reasoning_tokens=4, max_steps=12, lr=3e-3, val_queries=0, refresh_pool=10,
                    hard_negatives=4, checkpoint_every=2, progress=False)
    return GRPOConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def finished_run(tiny_beir, sft_run):
    torch.set_num_threads(1)
    cfg = grpo_config(tiny_beir, sft_run, sft_run / "grpo")
    return cfg, train(cfg)


def test_reward_improves_and_documents_refresh(finished_run):
    cfg, checkpoint = finished_run
    steps = [r for r in records(cfg.output_dir) if "reward" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    rewards = [r["reward"] for r in steps]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards
    assert steps[0]["docs_reencoded"] == 0  # the index was built by this very version
    assert all(r["docs_reencoded"] > 0 for r in steps[1:])  # every optimiser step makes the rows it needs stale
    assert steps[-1]["encoder_version"] == 4 + 12  # SFT's 4 steps, then one bump per GRPO step
    assert steps[0]["loss_kl"] == 0.0 and steps[-1]["loss_kl"] > 0.0  # fresh adapters start at the reference
    assert all(0 <= r["reasoning_len"] <= cfg.reasoning_tokens for r in steps)
    assert (Path(cfg.output_dir) / "metrics.png").stat().st_size > 1000
    assert checkpoint.name == "step-000012"


def test_resume_after_a_kill_repeats_the_uninterrupted_run(finished_run, train_until_killed, tmp_path):
    reference_cfg, _ = finished_run
    cfg = GRPOConfig(**{**asdict(reference_cfg), "output_dir": str(tmp_path / "killed")})
    train_until_killed("agents.grpo", cfg, step=5, key="reward")  # the last checkpoint is step 4
    assert (Path(cfg.output_dir) / "latest").read_text() == "step-000004"
    train(cfg)
    assert records(cfg.output_dir) == records(reference_cfg.output_dir)
    with pytest.raises(ValueError, match="other settings.*lr"):
        train(GRPOConfig(**{**asdict(cfg), "lr": 0.5}))


def test_a_run_older_than_a_setting_resumes_with_its_default(finished_run, tmp_path):
    cfg, checkpoint = finished_run
    old_run = tmp_path / "old"
    shutil.copytree(cfg.output_dir, old_run)
    saved = old_run / "checkpoints" / checkpoint.name / "config.json"
    settings = json.loads(saved.read_text())
    del settings["pseudo_queries"]  # as written before the setting existed
    saved.write_text(json.dumps({**settings, "output_dir": str(old_run)}))
    assert resumable_checkpoint(old_run, replace(cfg, output_dir=str(old_run))).name == checkpoint.name
    with pytest.raises(ValueError, match="other settings.*pseudo_queries"):
        resumable_checkpoint(old_run, replace(cfg, output_dir=str(old_run), pseudo_queries=3))


def test_checkpoint_loads_as_a_reasoning_agent(finished_run):
    cfg, checkpoint = finished_run
    agent, documents = load_agent(checkpoint)
    assert documents is agent and agent.version == 16 and "-grpo-" in agent.name
    assert agent.reasoning_tokens == cfg.reasoning_tokens
    texts = ["boundary layer flow", "shock wave"]
    np.testing.assert_array_equal(agent.encode_queries(texts), agent.encode_queries(texts))  # greedy reasoning


def test_cli_eval_takes_a_grpo_run(finished_run, tiny_beir, capsys):
    cfg, _ = finished_run
    assert main(["eval", "--data", str(tiny_beir), "--encoder", f"llm:{cfg.output_dir}", "--reasoning", "4", "--json",
                 "--no-progress", "--no-cache"]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert reported["agent"] == f"llm:{cfg.output_dir}+reasoning4" and 0.0 <= reported["ndcg@10"] <= 1.0


def test_format_reward_and_group_advantages():
    embed = 99
    reward, emitted = format_reward([[1, 2, embed], [1, 2, 3], [1], []], embed, budget=3)
    np.testing.assert_array_equal(reward, [1.0, 0.0, 0.5, 0.5])  # emitted; cut off at budget; stopped; stopped
    np.testing.assert_array_equal(emitted, [True, False, False, False])
    adv = group_advantages(np.array([1.0, 0.0, 0.5, 0.5]), group=2)
    np.testing.assert_allclose(adv, [1.0, -1.0, 0.0, 0.0], atol=1e-3)  # a tied group carries no signal


def test_contrastive_targets_never_use_a_relevant_document_as_negative():
    a, b, c, x, y = range(5)  # index rows
    scored = SimpleNamespace(relevant_positions=np.array([[a, b], [c, -1]]), grades=np.array([[1, 2], [1, 0]]),
                             top_positions=np.array([[x, a, c], [b, y, -1]]))
    candidates, positive, exclude = contrastive_targets(scored, hard_negatives=2)
    assert candidates == [b, c, x, y]  # unique, positives first (b has the higher grade)
    assert positive.tolist() == [0, 1]
    assert exclude.tolist() == [[False, False, False, False], [False, False, False, False]]
    scored.relevant_positions, scored.grades = np.array([[a, b, y], [c, -1, -1]]), np.array([[1, 2, 1], [1, 0, 0]])
    _, _, exclude = contrastive_targets(scored, hard_negatives=2)
    assert exclude[0].tolist() == [False, False, False, True]  # y is relevant to query 0: masked for it only


def test_several_updates_per_batch_reuse_the_rollouts_under_the_clip(tiny_beir, sft_run, tmp_path):
    cfg = grpo_config(tiny_beir, sft_run, tmp_path / "mu2", max_steps=2, updates_per_batch=2, queries_per_step=2,
                      lr=3e-2, clip_eps=0.01)
    train(cfg)
    steps = [r for r in records(cfg.output_dir) if "reward" in r]
    assert [r["encoder_version"] for r in steps] == [4 + 2, 4 + 4]  # one version per optimiser step
    assert all(r["clip_frac"] > 0 for r in steps)  # the second update moved some ratios past 1 +- eps


def test_pseudo_queries_are_body_excerpts_relevant_to_their_own_document(tiny_beir):
    train_split = load_beir(tiny_beir).split("train")
    judged = train_split.judged_query_ids[:3]
    data = query_collection(train_split, judged, "tiny", n_pseudo=5, seed=0)
    assert data.judged_query_ids[:3] == judged  # judged queries first, so pseudo_queries=0 draws as before
    pseudo = data.judged_query_ids[3:]
    assert len(pseudo) == 5 and len(set(pseudo)) == 5
    for query_id in pseudo:
        (doc_id, grade), = data.qrels[query_id].items()
        assert query_id == f"pseudo-{doc_id}" and grade == 1
        body = train_split.corpus[doc_id].text
        assert data.queries[query_id] in body and data.queries[query_id] != body  # part of the body, not the title
    assert query_collection(train_split, judged, "tiny", n_pseudo=5, seed=0).queries == data.queries


def test_grpo_draws_pseudo_queries_and_logs_their_reward_apart(tiny_beir, sft_run, tmp_path, caplog):
    cfg = grpo_config(tiny_beir, sft_run, tmp_path / "pseudo", max_steps=2, queries_per_step=20, pseudo_queries=10)
    with caplog.at_level("INFO", logger="agents.grpo"):
        train(cfg)
    assert "22 train queries (12 judged + 10 pseudo-queries)" in caplog.text
    steps = [r for r in records(cfg.output_dir) if "reward" in r]
    for r in steps:
        assert r["pseudo_share"] == pytest.approx(0.5, abs=0.2)
        share = r["pseudo_share"]
        assert r["reward_env"] == pytest.approx(share * r["reward_env_pseudo"] + (1 - share) * r["reward_env_judged"])


def test_checkpoints_save_the_env_rows_as_segments_and_rotation_keeps_exactly_what_they_need(finished_run):
    from searchr3_env.index import CorpusIndex

    cfg, checkpoint = finished_run
    folder = Path(cfg.output_dir) / "index"
    kept = sorted(p.name for p in checkpoint.parent.glob("step-*"))
    manifests = sorted(folder.glob("step-*.json"))
    assert [p.stem for p in manifests] == kept  # one manifest per kept checkpoint, older ones pruned
    needed = {seg["file"] for m in manifests for seg in json.loads(m.read_text())["segments"]}
    assert {p.name for p in folder.glob("*.npz")} == needed  # no segment a kept checkpoint needs is gone, no other
    for manifest in manifests:
        assert len(CorpusIndex.load_incremental(manifest)) == len(load_beir(cfg.data).corpus)
