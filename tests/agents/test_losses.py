"""Each SFT loss term against a case small enough to compute by hand."""

import math

import pytest
import torch

from agents.losses import info_nce, kl_to_reference, lm_cross_entropy, triplet_margin


def test_info_nce_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    docs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # Query 0: scores (1, 0, 0.6) / T=0.5 -> (2, 0, 1.2); query 1: (0, 2, 1.6); positives 0 and 1.
    expected_0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(1.2)))
    expected_1 = -math.log(math.exp(2) / (math.exp(0) + math.exp(2) + math.exp(1.6)))
    loss = info_nce(q, docs, torch.tensor([0, 1]), temperature=0.5)
    assert loss.item() == pytest.approx((expected_0 + expected_1) / 2, rel=1e-6)
    # Excluding query 1's third candidate (also relevant to it) removes it from its denominator only.
    exclude = torch.tensor([[False, False, False], [False, False, True]])
    expected_1 = -math.log(math.exp(2) / (math.exp(0) + math.exp(2)))
    loss = info_nce(q, docs, torch.tensor([0, 1]), temperature=0.5, exclude=exclude)
    assert loss.item() == pytest.approx((expected_0 + expected_1) / 2, rel=1e-6)


def test_info_nce_checks_its_inputs():
    q, docs = torch.eye(2), torch.eye(2)
    with pytest.raises(ValueError, match="must not mask a query's own positive"):
        info_nce(q, docs, torch.tensor([0, 1]), 0.1, exclude=torch.eye(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected dim 2"):
        info_nce(q, torch.ones(3, 4), torch.tensor([0, 1]), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, docs, torch.tensor([0, 1]), 0.0)
    with pytest.raises(ValueError, match="float tensor"):
        info_nce(q.long(), docs, torch.tensor([0, 1]), 0.1)


def test_triplet_margin_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[0.6, 0.8]])  # cos 0.6
    neg = torch.tensor([[[0.8, 0.6], [0.0, 1.0]]])  # cos 0.8 (violates), cos 0 (satisfied)
    # max(0, 0.3 - 0.6 + 0.8) = 0.5 and max(0, 0.3 - 0.6 + 0) = 0 -> mean 0.25
    assert triplet_margin(q, pos, neg, margin=0.3).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="negatives"):
        triplet_margin(q, pos, neg[0], margin=0.3)


def test_kl_to_reference_by_hand():
    p = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    ref = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    assert kl_to_reference(p, ref).item() == pytest.approx(expected, rel=1e-6)
    assert kl_to_reference(ref, ref).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="reference_logits"):
        kl_to_reference(p, ref[:1])


def test_kl_to_reference_leaves_out_a_token_the_reference_never_learned():
    # Token 2 is new: the model gives it 0.5, the reference almost nothing. Over tokens 0 and 1
    # (renormalised) both distributions agree, so the KL that leaves token 2 out is zero.
    p = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    ref = torch.log(torch.tensor([[0.5 - 5e-7, 0.5 - 5e-7, 1e-6]]))
    assert kl_to_reference(p, ref).item() > 6.0  # counted in, it is a veto of 0.5 * log(0.5 / 1e-6) nats
    assert kl_to_reference(p, ref, unknown=2).item() == pytest.approx(0.0, abs=1e-6)
    # Left out, the rest is the KL of the renormalised distributions, by hand.
    p = torch.log(torch.tensor([[0.2, 0.6, 0.2]]))
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_to_reference(p, ref, unknown=2).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        kl_to_reference(p, ref, unknown=3)


def test_lm_cross_entropy_by_hand():
    logits = torch.zeros(3, 4)  # uniform over 4 tokens
    logits[2] = torch.tensor([math.log(3.0), 0.0, 0.0, 0.0])  # target 0 has probability 1/2
    expected = (math.log(4) * 2 + math.log(2)) / 3
    assert lm_cross_entropy(logits, torch.tensor([1, 3, 0])).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="targets"):
        lm_cross_entropy(logits, torch.tensor([1, 3]))
