"""LLMEmbedder on a tiny random Llama: where the embed token sits, padding invariance, the encoder protocol."""

import numpy as np
import pytest
import torch

from agents.embedder import LLMEmbedder, cut_at_stop
from agents.models import load_causal_lm, resolve_model_dir
from agents.prompts import EMBED_TOKEN
from searchr3_env import Encoder

TEXTS = ["boundary layer flow", "heat transfer at high speed over a flat plate", "shock wave",
         "buckling of cylinder shells under load theory and experiment results", ""]


def test_embed_token_is_one_new_special_token_at_the_end_of_every_prompt(tiny_embedder):
    e, tok = tiny_embedder, tiny_embedder.tokenizer
    assert tok.convert_ids_to_tokens(e.embed_id) == EMBED_TOKEN
    assert e.model.get_input_embeddings().num_embeddings >= len(tok) > e.embed_id
    (query,) = e.query_sequences(["shock wave"])
    (doc,) = e.document_sequences(["a flat plate"])
    assert query[-1] == doc[-1] == e.embed_id and query.count(e.embed_id) == 1
    text = tok.decode(query)
    assert text.startswith("<|im_start|>system\nPlease represent user queries.<|im_end|>\n<|im_start|>user\nshock wave")
    assert text.endswith("<|im_start|>assistant\nThe embedding is " + EMBED_TOKEN)
    assert "Please represent the document." in tok.decode(doc)
    # Adding the token again changes nothing.
    again = LLMEmbedder(e.model, tok)
    assert again.embed_id == e.embed_id and len(tok) == e.model.get_input_embeddings().num_embeddings


def test_reasoning_goes_before_the_answer_and_an_emitted_embed_token_is_not_repeated(tiny_embedder):
    e = tiny_embedder
    plain = e.query_sequences(["shock wave"])[0]
    start = e.query_response_starts(["shock wave"])[0]
    with_reasoning = e.query_sequences(["shock wave"], [[40, 41]])[0]
    assert with_reasoning[:start] == plain[:start]
    assert with_reasoning[start : start + 2] == [40, 41] and with_reasoning[-len(e.query_template.answer):] == e.query_template.answer
    emitted = e.query_sequences(["shock wave"], [[40, e.embed_id]])[0]
    assert emitted == plain[:start] + [40, e.embed_id]
    assert cut_at_stop([5, 6, 2, 2], {2, 9}, 9) == [5, 6]
    assert cut_at_stop([5, 9, 2], {2, 9}, 9) == [5, 9]
    assert cut_at_stop([5, 6], {2, 9}, 9) == [5, 6]


def test_lowercase_folds_case_of_queries_and_documents_only_when_asked(tiny_embedder):
    folded = LLMEmbedder(tiny_embedder.model, tiny_embedder.tokenizer, lowercase=True)
    assert folded.query_sequences(["SHOCK Wave"]) == tiny_embedder.query_sequences(["shock wave"])
    assert folded.document_sequences(["A Flat PLATE"]) == tiny_embedder.document_sequences(["a flat plate"])
    assert tiny_embedder.query_sequences(["SHOCK Wave"]) != tiny_embedder.query_sequences(["shock wave"])


def test_forward_refuses_a_sequence_without_the_embed_token(tiny_embedder):
    with pytest.raises(ValueError, match="does not end with"):
        tiny_embedder.forward([[1, 2, 3]])


def test_embedding_does_not_depend_on_the_rest_of_the_batch(tiny_embedder):
    e = tiny_embedder
    alone = np.concatenate([e.encode_documents([t]) for t in TEXTS])
    e.batch_size = len(TEXTS)
    together = e.encode_documents(TEXTS)
    shuffled = e.encode_documents(TEXTS[::-1])[::-1]
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(shuffled, alone, atol=1e-5)
    assert not np.allclose(alone[0], alone[1], atol=1e-3)  # different texts, different vectors


def test_encoder_protocol_and_differentiable_forward(tiny_embedder):
    e = tiny_embedder
    assert isinstance(e, Encoder) and e.dim == 32 and e.version == 0
    for out in (e.encode_documents(TEXTS), e.encode_queries(TEXTS)):
        assert out.shape == (len(TEXTS), 32) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert e.encode_queries([]).shape == (0, 32)
    emb = e.forward(e.query_sequences(TEXTS[:2])).embeddings
    assert emb.requires_grad
    emb.sum().backward()
    assert e.model.get_input_embeddings().weight.grad is not None
    e.bump_version()
    assert e.version == 1


def test_queries_with_reasoning_generate_at_most_n_tokens(tiny_embedder):
    e = tiny_embedder
    e.reasoning_tokens = 5
    reasoning = e.generate_reasoning(TEXTS[:3])
    assert len(reasoning) == 3 and all(len(r) <= 5 for r in reasoning)
    assert reasoning == e.generate_reasoning(TEXTS[:3])  # greedy is deterministic
    out = e.encode_queries(TEXTS[:3])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    e.sample = True
    torch.manual_seed(0)
    assert all(len(r) <= 5 for r in e.generate_reasoning(TEXTS[:3]))


def test_model_folders_are_checked(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(tmp_path)
    model, tokenizer = load_causal_lm(tiny_model_dir)
    assert not model.training and model.config.hidden_size == 32
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(tiny_model_dir, dtype="int8")


def test_with_options_is_a_view_that_leaves_the_original_alone(tiny_embedder):
    reasoning = tiny_embedder.with_options(reasoning_tokens=3, batch_size=2)
    assert reasoning.model is tiny_embedder.model and reasoning.reasoning_tokens == 3 and reasoning.batch_size == 2
    assert tiny_embedder.reasoning_tokens == 0 and tiny_embedder.batch_size == 4
    texts = ["boundary layer flow", "shock wave"]
    np.testing.assert_array_equal(tiny_embedder.with_options().encode_queries(texts), tiny_embedder.encode_queries(texts))
    assert tiny_embedder.cache_key == reasoning.cache_key  # query-side settings do not change document rows
