"""LoRA extraction by truncated SVD (engine/train/extract.py): exact on low-rank changes, Eckart–Young error on
truncation, convolutions, rank by energy, what a LoRA cannot hold, and our file format reloading exactly."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.train.extract import choose_rank, extract_module, low_rank

torch.set_num_threads(1)


def _low_rank_delta(shape, r, seed):
    g = torch.Generator().manual_seed(seed)
    out, rest = shape[0], math.prod(shape[1:])
    return (torch.randn(out, r, generator=g) @ torch.randn(r, rest, generator=g)).reshape(shape)


@pytest.mark.parametrize("shape", [(48, 40), (32, 16, 3, 3), (24, 24, 1, 1)])
def test_a_low_rank_change_is_recovered_exactly(shape):
    delta = _low_rank_delta(shape, 3, seed=len(shape))
    up, down, err = low_rank(delta, 3)
    assert down.shape == (3, *shape[1:]) and up.shape == (shape[0], 3, *(1, 1)[: len(shape) - 2])
    rebuilt = (up.reshape(shape[0], 3) @ down.reshape(3, -1)).reshape(shape)
    assert err / float(delta.norm()) < 1e-5
    assert torch.allclose(rebuilt, delta, atol=1e-4 * float(delta.abs().max()))
    # A larger rank than the change has adds nothing: the extra singular values are ~0.
    assert low_rank(delta, 8)[2] / float(delta.norm()) < 1e-5


def test_truncation_error_is_the_discarded_singular_values():
    """Eckart–Young–Mirsky (Eckart & Young 1936): the best rank-r approximation in Frobenius norm is the truncated
    SVD, and its error is sqrt(Σ_{i>r} s_i²). The measured reconstruction error must equal that, and a random
    rank-r factorisation must do worse."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 50, generator=g, dtype=torch.float64).float()
    s = torch.linalg.svdvals(delta.double())
    for r in (1, 5, 20, 49):
        up, down, err = low_rank(delta, r)
        assert up.shape[1] == r
        expected = float(s[r:].pow(2).sum().sqrt())
        assert err == pytest.approx(expected, rel=1e-4)
        other = torch.randn(64, r, generator=g) @ torch.randn(r, 50, generator=g) * 0.1
        assert float((delta - other).norm()) > err


def test_conv_3x3_extraction_acts_like_the_weight_change():
    """A PEFT conv LoRA: down is a conv with the layer's kernel, up a 1×1 conv; their composition is ΔW's conv."""
    delta = _low_rank_delta((16, 8, 3, 3), 4, seed=3)
    up, down, _ = low_rank(delta, 4)
    x = torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(1))
    want = F.conv2d(x, delta, padding=1)
    got = F.conv2d(F.conv2d(x, down, padding=1), up)
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))


def test_rank_by_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert choose_rank(s, 16, 0.0) == 4  # capped by the matrix
    assert choose_rank(s, 2, 0.0) == 2
    assert choose_rank(s, 16, 16 / 22) == 1  # exactly reached by the first
    assert choose_rank(s, 16, 0.8) == 2  # 20/22 = 0.91 ≥ 0.8 > 16/22
    assert choose_rank(s, 16, 0.95) == 3
    assert choose_rank(s, 16, 1.0) == 4
    assert choose_rank(s, 2, 1.0) == 2  # the cap still holds
    with pytest.raises(ValueError):
        choose_rank(s, 0)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.LayerNorm(20), torch.nn.Unflatten(1, (5, 2, 2)),
                               torch.nn.Conv2d(5, 6, 3, padding=1), torch.nn.Conv2d(6, 6, 1, groups=2),
                               torch.nn.Linear(2, 2))


def test_extract_module_covers_linear_and_conv_and_reports_the_rest():
    base, tuned = _net(), _net()
    with torch.no_grad():
        tuned[0].weight += _low_rank_delta((20, 12), 2, seed=1) * 0.1
        tuned[0].bias += 0.5  # a bias: not representable
        tuned[1].weight += 0.2  # a norm: not representable
        tuned[3].weight += _low_rank_delta((6, 5, 3, 3), 2, seed=2) * 0.1
        tuned[4].weight += 0.3  # a grouped conv: not representable by a plain LoRA
        # tuned[5] unchanged: skipped
    ex = extract_module("unet", base, tuned, rank=4)
    assert [(x.path, x.rank) for x in ex.layers] == [("0", 4), ("3", 4)]  # rank = the cap, not the change's rank
    assert all(x.rel_error < 1e-5 for x in ex.layers) and ex.rel_error < 1e-5
    names = dict(ex.unrepresented)
    assert set(names) == {"unet.0.bias", "unet.1.weight", "unet.4.weight"}
    assert names["unet.0.bias"] == pytest.approx(0.5 * math.sqrt(20), rel=1e-5)
    assert 0 < ex.unrepresented_share < 1
    report = ex.report()
    assert report["layers"] == 2 and report["ranks"] == {"unet.0": 4, "unet.3": 4}
    # rank 1: the error is now the second singular value's share, per layer and overall
    ex1 = extract_module("unet", base, tuned, rank=1)
    for x in ex1.layers:
        d = (tuned[int(x.path)].weight - base[int(x.path)].weight).detach().reshape(x.up.shape[0], -1)
        s = torch.linalg.svdvals(d.double())
        assert x.rel_error == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-3)
    assert ex1.rel_error == pytest.approx(math.sqrt(sum(x.error ** 2 for x in ex1.layers) /
                                                    sum(x.delta_norm ** 2 for x in ex1.layers)))
