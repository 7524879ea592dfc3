"""The corpus-index cache never hands one model's document embeddings to another."""

from __future__ import annotations

import json
import os

import pytest

from agents.cli import main
from searchr3_env.cache_keys import file_digest, folder_digest


def copy_model(src, dst, seed: int):
    """The tiny model's folder with its weights re-drawn from ``seed``: same files, other numbers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def eval_json(capsys, data, model, *cache) -> dict:
    assert main(["eval", "--data", str(data), "--encoder", f"llm:{model}", "--json", "--no-progress",
                 "--max-doc-tokens", "24", *cache]) == 0
    return json.loads(capsys.readouterr().out)


def test_models_in_folders_of_the_same_name_do_not_share_a_cached_index(tmp_path, tiny_model_dir, tiny_beir, capsys):
    a = copy_model(tiny_model_dir, tmp_path / "a" / "model", seed=1)
    b = copy_model(tiny_model_dir, tmp_path / "b" / "model", seed=2)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    a_cached = eval_json(capsys, tiny_beir, a, *cache)
    b_cached = eval_json(capsys, tiny_beir, b, *cache)  # same folder name, same settings: once reused a's rows
    b_fresh = eval_json(capsys, tiny_beir, b, "--no-cache")
    assert b_cached == b_fresh
    assert a_cached != b_fresh  # the two models do rank differently, so reuse would have shown
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    assert eval_json(capsys, tiny_beir, a, *cache) == a_cached  # and a's own index is still reused


def test_settings_that_change_document_rows_change_the_key(tiny_model_dir):
    from agents.config import SFTConfig
    from agents.policy import build_embedder

    base = SFTConfig(data="", model=str(tiny_model_dir), max_doc_tokens=24)
    keys = {build_embedder(base).cache_key}
    for change in ({"max_doc_tokens": 12}, {"lowercase": True}, {"dtype": "bfloat16"}):
        keys.add(build_embedder(SFTConfig(**{**base.__dict__, **change})).cache_key)
    assert len(keys) == 4
    assert build_embedder(base).cache_key in keys  # and the same settings give the same key
    embedder = build_embedder(base)
    embedder.bump_version()  # trained weights are no longer the files': nothing may cache them
    assert embedder.cache_key is None


def test_file_digest_is_memoised_but_sees_a_changed_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 100)
    first = file_digest(path)
    assert file_digest(path) == first
    path.write_bytes(b"b" * 101)
    assert file_digest(path) != first
    stat = path.stat()
    path.write_bytes(b"c" * 101)  # same size: the modification time tells it apart
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert file_digest(path) != first


def test_folder_digest_ignores_hidden_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    before = folder_digest(tmp_path)
    (tmp_path / ".lock").write_text("")
    assert folder_digest(tmp_path) == before
    (tmp_path / "tokenizer.json").write_text("{}")
    assert folder_digest(tmp_path) != before
    with pytest.raises(FileNotFoundError, match="not a folder"):
        folder_digest(tmp_path / "missing")
