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
    monkeypatch.setattr(kernels, "_ALIGN_TILE_LIMIT", 0)  # force the prompt path
    slow = kernels.align_assignments(index, E, block_m)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    n = index.numel()
    live = sorted(int(a) for a in fast[0].tolist() if a < n)
    assert live == sorted(int(a) for a in (index.flatten() < E).nonzero().flatten())  # each kept one exactly once
