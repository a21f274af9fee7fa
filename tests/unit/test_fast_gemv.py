"""The decode step's dense GEMV (fast/gemv.py) against x @ W^T: row counts 1-4, ragged rows and columns, split-K
slices, bf16 output rounding. CPU (CI): Triton's interpreter in float32; CUDA: compiled, bf16."""
import pytest
import torch

pytest.importorskip("triton")

from moesweep.fast import gemv  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (rows of W, columns): multiples of the tiles, ragged ones, and (GPU only) the Qwen3-30B-A3B o-projection
SHAPES = [(64, 256), (40, 96), (100, 300)] + ([(2048, 4096), (5120, 2048)] if CUDA else [])


def _reference(x, w):
    return x.double() @ w.double().T


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemv_equals_matmul(m, shape):
    n, k = shape
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(n, k, generator=g) * 0.05).to(DEVICE, DTYPE)
    y = gemv.dense_gemv(x, w)
    assert y.shape == (m, n) and y.dtype == DTYPE
    want = _reference(x, w)
    # float32 accumulation rounded once to the output dtype: within one rounding of it (CPU: float32 sums)
    tol = 2 ** -7 if CUDA else 1e-5
    assert torch.isfinite(y).all()
    assert ((y.double() - want).abs() <= tol * want.abs() + tol * 0.05 * k ** 0.5).all()


@pytest.mark.parametrize("split", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_split_k_partials_sum_to_the_product(split, shape):
    n, k = shape
    g = torch.Generator().manual_seed(split * 7 + n)
    x = torch.randn(3, k, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(n, k, generator=g) * 0.05).to(DEVICE, DTYPE)
    parts = gemv.dense_gemv(x, w, split)
    assert parts.shape == (split, 3, n) and parts.dtype == torch.float32
    assert torch.isfinite(parts).all()  # every slice writes every element (slices past K write zeros)
    want = _reference(x, w)
    assert torch.allclose(parts.sum(0).double(), want, rtol=1e-4, atol=1e-4 * k ** 0.5)


def test_split_for_fills_the_grid_and_keeps_whole_tiles():
    tiles = {"BN": 8, "BK": 256, "num_warps": 4}
    # o_proj of Qwen3-30B-A3B: 2048 rows -> 256 programs of 8 rows, 4 slices of 1024 columns give 1024 programs
    assert gemv.split_for(2048, 4096, tiles) == 4
    assert gemv.split_for(5120, 2048, tiles) == 2
    assert gemv.split_for(64, 256, tiles) == 1  # a slice is never shorter than two tiles
    # what the engine runs (results/nvidia-h200/decode_gemv.md)
    assert gemv.split_for(2048, 4096, gemv.O_PROJ_TILES) == 4


@pytest.mark.parametrize("tiles", [{"BN": 8, "BK": 512, "num_warps": 4}, {"BN": 32, "BK": 64, "num_warps": 2}])
def test_other_tiles_give_the_same_product(tiles):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 300, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(72, 300, generator=g) * 0.05).to(DEVICE, DTYPE)
    want = _reference(x, w)
    for split in (None, 3):
        y = gemv.dense_gemv(x, w, split, tiles)
        y = y if split is None else y.sum(0)
        assert torch.allclose(y.double(), want, rtol=2 ** -7 if CUDA else 1e-5, atol=1e-2 if CUDA else 1e-5)


def test_bad_shapes_are_refused():
    x = torch.randn(5, 64, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="up to 4 rows"):
        gemv.dense_gemv(x, torch.randn(32, 64, device=DEVICE, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"weight \[N, K\]"):
        gemv.dense_gemv(x[:2], torch.randn(32, 48, device=DEVICE, dtype=DTYPE))
