"""Product quantisation: encoding is nearest-codeword per subspace; the EMA update is a k-means step."""

import pytest
import torch

from spt_kernels import ProductQuantizer, pq_encode


def nearest_codewords(x, codebook):
    """Brute force: per row and subspace, the index of the closest codeword (torch.cdist, an independent path)."""
    n_sub, _, sub_dim = codebook.shape
    rows = x.reshape(-1, n_sub, sub_dim)
    return torch.stack([torch.cdist(rows[:, m], codebook[m]).argmin(-1) for m in range(n_sub)], dim=1)


def test_encode_is_nearest_codeword_per_subspace():
    x = torch.randn(2, 3, 17, 32)
    codebook = torch.randn(4, 16, 8)
    codes = pq_encode(x, codebook, backend="reference")
    assert codes.shape == (2, 3, 17, 4) and codes.dtype == torch.uint8
    assert torch.equal(codes.reshape(-1, 4).long(), nearest_codewords(x, codebook))


def test_encode_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="M \\* d"):
        pq_encode(torch.randn(5, 30), torch.randn(4, 16, 8))
    with pytest.raises(ValueError, match="not divisible"):
        ProductQuantizer(head_dim=30, subspace_dim=8)


def lloyd_step(rows, codebook):
    """One k-means iteration per subspace, written with explicit loops."""
    n_sub, n_codes, sub_dim = codebook.shape
    assign = nearest_codewords(rows, codebook)
    parts = rows.reshape(-1, n_sub, sub_dim)
    new = codebook.clone()
    for m in range(n_sub):
        for c in range(n_codes):
            members = parts[assign[:, m] == c, m]
            if len(members):
                new[m, c] = members.mean(0)
    return new


def test_update_with_zero_decay_is_one_lloyd_step():
    pq = ProductQuantizer(head_dim=16, subspace_dim=4, codewords=8, decay=0.0)
    rows = torch.randn(300, 16)
    pq.encode(rows[:50])  # initialises the codebook from data
    before = pq.codebook.clone()
    pq.update(rows)
    torch.testing.assert_close(pq.codebook, lloyd_step(rows, before))


def distortion(pq, rows):
    codes = pq.encode(rows).long()  # (N, M)
    recon = torch.stack([pq.codebook[m, codes[:, m]] for m in range(pq.codebook.shape[0])], dim=1)
    return ((rows - recon.reshape(rows.shape)) ** 2).sum(-1).mean()


def test_updates_follow_the_data_when_it_moves():
    centers = torch.randn(6, 16) * 4
    rows = centers[torch.randint(0, 6, (2000,))] + 0.1 * torch.randn(2000, 16)
    pq = ProductQuantizer(head_dim=16, subspace_dim=4, codewords=8, decay=0.5)
    pq.initialize(torch.randn(100, 16))  # fitted to other data: the clusters are not where it expects
    start = distortion(pq, rows)
    for _ in range(10):
        pq.update(rows[torch.randperm(2000)[:500]])
    assert distortion(pq, rows) < 0.75 * start


def test_codebook_starts_as_kmeans_of_the_first_data_and_is_saved_in_state_dict():
    pq = ProductQuantizer(head_dim=16, subspace_dim=8, codewords=4)
    rows = torch.randn(40, 16)
    pq.encode(rows)
    assert bool(pq.initialized)
    expected = rows[torch.linspace(0, 39, 4).round().long()].view(4, 2, 8).transpose(0, 1)  # evenly spaced rows...
    for _ in range(10):  # ...then Lloyd iterations
        expected = lloyd_step(rows, expected)
    torch.testing.assert_close(pq.codebook, expected)
    assert set(pq.state_dict()) == {"codebook", "ema_count", "ema_sum", "initialized"}


def test_kmeans_start_quantises_better_than_data_rows():
    centers = torch.randn(12, 16) * 3
    rows = centers[torch.randint(0, 12, (3000,))] + 0.5 * torch.randn(3000, 16)
    fitted = ProductQuantizer(head_dim=16, subspace_dim=4, codewords=8)
    fitted.initialize(rows)
    picked = ProductQuantizer(head_dim=16, subspace_dim=4, codewords=8)
    picked.initialize(rows)
    picked.codebook.copy_(rows[torch.linspace(0, 2999, 8).round().long()].view(8, 4, 4).transpose(0, 1))
    assert distortion(fitted, rows) < 0.9 * distortion(picked, rows)
