"""moec.export_complex: complex rotary math as real pairs (what export traces) equals torch's complex math."""

import pytest
import torch

from moec.export_complex import as_real_pairs


def _rotary(x: torch.Tensor, positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """DeepSeek-V2 / Llama 4's complex rotary: x [B, S, H, D], positions [B, S]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, x.shape[-1], 2).float() / x.shape[-1]))
    freqs = positions[..., None].float() * inv_freq
    freqs_cis = torch.mul(torch.polar(torch.ones_like(freqs), freqs), scaling)
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(freqs_cis[:, :, None, :] * x_).flatten(3).type_as(x)


@pytest.mark.parametrize("shape", [(1, 1, 2, 8), (3, 17, 4, 64)])
def test_real_pairs_compute_the_complex_rotary(shape):
    x = torch.randn(shape) * 100  # large magnitudes
    positions = torch.randint(0, 4096, shape[:2])
    want = _rotary(x, positions, 0.7)
    with as_real_pairs():
        got = _rotary(x, positions, 0.7)
    assert not got.is_complex() and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


def test_other_complex_ops_are_refused():
    with as_real_pairs(), pytest.raises(NotImplementedError, match="abs"):
        torch.abs(torch.polar(torch.ones(3), torch.zeros(3)))
    with as_real_pairs(), pytest.raises(NotImplementedError, match="conj"):
        torch.view_as_complex(torch.ones(3, 2)).conj()
