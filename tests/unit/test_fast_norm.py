"""fast/norm.py's residual + RMSNorm (+ router logits) launch against the torch glue it replaces in the decode step
(engine._add_expert_outputs, engine._rms_norm, engine._post_attention). CPU: Triton's interpreter in float32, held
to float32 rounding; CUDA: bf16, held to one bf16 rounding step."""
import pytest
import torch

pytest.importorskip("triton")

from moesweep.fast import norm  # noqa: E402
from moesweep.fast.engine import _add_expert_outputs, _post_attention, _rms_norm  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
EPS = 1e-6


def _close(got, want):
    if CUDA:  # one bf16 rounding step apart at most (the float32 sums add in another order)
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-2)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _inputs(B, H, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, generator=g).to(DEVICE, DTYPE)
    weight = (1 + 0.1 * torch.randn(H, generator=g)).to(DEVICE, DTYPE)
    return g, x, weight


@pytest.mark.parametrize("B,H,k", [(1, 64, 4), (3, 48, 3), (5, 100, 1)])
def test_expert_outputs_into_residual_then_norm(B, H, k):
    g, x, weight = _inputs(B, H, seed=B)
    moe_out = torch.randn(B * k, H, generator=g).to(DEVICE)  # float32, as FastMoeExperts.run
    got_x, got_h = norm.residual_rms_norm(x, moe_out, k, weight, EPS)
    want_x = _add_expert_outputs(x, moe_out)
    _close(got_x, want_x)
    _close(got_h, _rms_norm(want_x, weight, EPS))


def test_first_layer_has_nothing_to_add():
    _, x, weight = _inputs(2, 64, seed=9)
    got_x, got_h = norm.residual_rms_norm(x, None, 8, weight, EPS)
    assert torch.equal(got_x, x)
    _close(got_h, _rms_norm(x, weight, EPS))


@pytest.mark.parametrize("B,H,E,split", [(1, 64, 16, 4), (2, 96, 20, 1), (4, 64, 8, 2)])
def test_attention_output_norm_and_router_logits(B, H, E, split):
    """Split-K partial sums [S, B, H] (the GEMV o-projection) or one projected [B, H] (split 1, cuBLAS's output);
    E not a multiple of the router rows per program."""
    g, x, weight = _inputs(B, H, seed=10 + B)
    router = torch.randn(E, H, generator=g).to(DEVICE, DTYPE) * 0.1
    if split > 1:
        add = torch.randn(split, B, H, generator=g).to(DEVICE)
        want = _post_attention(x, add, None, None, weight, router, EPS, True)
    else:
        add = torch.randn(B, H, generator=g).to(DEVICE, DTYPE)
        want = _post_attention(x, add, torch.eye(H, device=DEVICE, dtype=DTYPE), None, weight, router, EPS, True)
    got = norm.residual_rms_norm(x, add, 1, weight, EPS, router)
    for g_, w_ in zip(got, want):
        _close(g_, w_)


def test_router_logits_beyond_the_row_limit_are_refused():
    _, x, weight = _inputs(norm.MAX_LOGIT_ROWS + 1, 64, seed=1)
    with pytest.raises(ValueError, match="router logits for up to"):
        norm.residual_rms_norm(x, None, 1, weight, EPS, torch.zeros(8, 64, device=DEVICE, dtype=DTYPE))
