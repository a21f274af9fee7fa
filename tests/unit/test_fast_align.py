"""The one-launch alignment of decode-sized routing results against the torch ops that align prompts."""
import pytest
import torch

pytest.importorskip("triton")

from moesweep.fast import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _index(T, k, E, seed, drop):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    index[torch.rand(T, k, generator=g) < drop] = E  # the sentinel of dropped assignments
    return index.to(DEVICE)


@pytest.mark.parametrize("T,k,E,block_m,drop", [(1, 8, 128, 16, 0.0), (8, 8, 128, 4, 0.1), (32, 8, 128, 4, 0.0),
                                                 (5, 3, 60, 16, 0.3), (7, 1, 16, 1, 0.5), (3, 2, 16, 4, 1.0)])
def test_one_launch_alignment_equals_the_torch_ops(monkeypatch, T, k, E, block_m, drop):
    index = _index(T, k, E, seed=T * 31 + k, drop=drop)
    fast = kernels.align_assignments(index, E, block_m)
    monkeypatch.setattr(kernels, "ALIGN_TILE_LIMIT", 0)  # force the prompt path
    slow = kernels.align_assignments(index, E, block_m)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    n = index.numel()
    live = sorted(int(a) for a in fast[0].tolist() if a < n)
    assert live == sorted(int(a) for a in (index.flatten() < E).nonzero().flatten())  # each kept one exactly once


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("with_hot", [True, False], ids=["hot-mask", "no-hot-mask"])
def test_one_launch_accounting_equals_routing_increments(monkeypatch, decode, with_hot):
    T, k, E = 6, 4, 16
    g = torch.Generator().manual_seed(7)
    index = _index(T, k, E, seed=5, drop=0.0)
    valid = (torch.rand(T, generator=g) > 0.3).to(DEVICE)
    keep_policy = (torch.rand(T, k, generator=g) > 0.2).to(DEVICE) & valid[:, None]
    keep = keep_policy & (torch.rand(T, k, generator=g) > 0.3).to(DEVICE)  # capacity drops some
    index = torch.where(keep, index, E)
    hot = (torch.rand(E, generator=g) > 0.5).to(DEVICE) if with_hot else None
    results = []
    for limit in (kernels.ALIGN_TILE_LIMIT, 0):  # one launch, then the torch ops
        monkeypatch.setattr(kernels, "ALIGN_TILE_LIMIT", limit)
        counts = torch.arange(9, dtype=torch.int64, device=DEVICE)  # accumulators start non-zero
        load = torch.arange(E, dtype=torch.int64, device=DEVICE)
        out = kernels.align_and_account(index, E, 4, valid, keep_policy, hot, counts, load, decode)
        results.append((*out, counts, load))
    for fast, slow in zip(*results):
        assert torch.equal(fast, slow)
