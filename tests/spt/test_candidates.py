"""Candidate selection against a brute-force loop: most matching codes, causal, padded slots are -1."""

import pytest
import torch

from spt_kernels import candidate_budget, select_candidates


def brute_force(q_codes, k_codes, budget, key_padding, sink_keys=0, keep_self=False):
    """Per query: rank valid keys by (matching codes, key index), keep `budget`, list them newest first, pad -1.

    Kept keys (the first `sink_keys` real keys, the query's own key if `keep_self`) rank above every match count.
    """
    batch, heads, q_len, _ = q_codes.shape
    kv_heads, kv_len = k_codes.shape[1:3]
    out = torch.full((batch, heads, q_len, budget), -1, dtype=torch.int32)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                pos = i + kv_len - q_len
                keys = [j for j in range(pos + 1) if key_padding is None or key_padding[b, j]]
                real = [j for j in range(kv_len) if key_padding is None or key_padding[b, j]]
                kept = set(real[:sink_keys]) | ({pos} if keep_self else set())

                def rank(j):
                    matches = int((q_codes[b, h, i] == k_codes[b, h // (heads // kv_heads), j]).sum())
                    return (q_codes.shape[-1] + 1 if j in kept else matches, j)

                scored = sorted(keys, key=rank, reverse=True)
                chosen = sorted(scored[:budget], reverse=True)
                out[b, h, i, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def random_codes(batch, heads, length, n_sub, n_codes):
    return torch.randint(0, n_codes, (batch, heads, length, n_sub), dtype=torch.uint8)


@pytest.mark.parametrize("sink_keys,keep_self", [(0, False), (2, True), (1, False), (0, True)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(
    "heads,kv_heads,q_len,kv_len,budget", [(4, 2, 20, 20, 5), (2, 1, 6, 23, 9), (2, 2, 12, 12, 12), (2, 1, 9, 9, 1)]
)
def test_matches_brute_force(padded, heads, kv_heads, q_len, kv_len, budget, sink_keys, keep_self):
    q_codes = random_codes(2, heads, q_len, 4, 3)
    k_codes = random_codes(2, kv_heads, kv_len, 4, 3)
    key_padding = None
    if padded:
        key_padding = torch.ones(2, kv_len, dtype=torch.bool)
        key_padding[1, : kv_len // 3] = False  # left padding: sequence 1's sinks start later
    got = select_candidates(
        q_codes, k_codes, budget, key_padding, backend="reference", sink_keys=sink_keys, keep_self=keep_self
    )
    assert got.dtype == torch.int32
    assert torch.equal(got, brute_force(q_codes, k_codes, budget, key_padding, sink_keys, keep_self))


def test_sinks_and_own_key_are_always_kept():
    """Even against keys matching in every subspace, each query keeps the first real key and its own key."""
    codes = torch.zeros(1, 1, 10, 4, dtype=torch.uint8)  # all keys match all queries fully
    key_padding = torch.tensor([[False, False] + [True] * 8])
    idx = select_candidates(codes, codes, 3, key_padding, backend="reference", sink_keys=1, keep_self=True)[0, 0]
    for i in range(3, 10):
        assert {2, i} <= set(idx[i].tolist()), f"row {i}: {idx[i].tolist()}"


def test_short_rows_are_padded_with_invalid_not_real_keys():
    q_codes = random_codes(1, 1, 16, 4, 2)
    k_codes = random_codes(1, 1, 16, 4, 2)
    budget = candidate_budget(16, 2)  # 8 slots
    idx = select_candidates(q_codes, k_codes, budget, backend="reference")[0, 0]
    for i in range(16):
        real = idx[i][idx[i] >= 0]
        assert len(real) == min(i + 1, budget)
        assert len(set(real.tolist())) == len(real), "a key was selected twice"
        assert (idx[i][len(real) :] == -1).all()


def test_padding_row_has_no_candidates():
    key_padding = torch.tensor([[False, False, True, True, True, True]])
    q_codes, k_codes = random_codes(1, 2, 6, 2, 2), random_codes(1, 2, 6, 2, 2)
    idx = select_candidates(q_codes, k_codes, 3, key_padding, backend="reference")
    assert (idx[0, :, :2] == -1).all()
    assert not torch.isin(idx, torch.tensor([0, 1], dtype=torch.int32)).any()


def test_budget_is_ceil_of_length_over_sparsity():
    assert candidate_budget(2048, 8) == 256
    assert candidate_budget(10, 8) == 2
    assert candidate_budget(10, 1) == 10


def test_errors_name_the_bad_input():
    codes = random_codes(1, 2, 4, 2, 2)
    with pytest.raises(TypeError, match="q_codes"):
        select_candidates(codes.long(), codes, 2)
    with pytest.raises(ValueError, match="budget"):
        select_candidates(codes, codes, 5)
    with pytest.raises(ValueError, match="key_padding"):
        select_candidates(codes, codes, 2, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="sink_keys"):
        select_candidates(codes, codes, 2, sink_keys=-1)
