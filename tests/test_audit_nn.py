"""Layer and model fixes from an audit: whole-model pickling, half-precision Glow sampling,
dtype errors that name the problem, the default dtype, ActNorm re-initialisation,
importance_log_prob as a pure evaluation, and numpy sample counts."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import flowkern
from flowkern.models import Glow, RealNVP

from tolerances import check_actnorm_init, check_against, layer_fn


def test_torch_save_whole_models_round_trip():
    torch.manual_seed(0)
    for model in (RealNVP(6, layers=2, hidden=8), Glow((1, 4, 4), levels=2, steps=1, hidden=8)):
        x = torch.randn(3, *((6,) if isinstance(model, RealNVP) else (1, 4, 4)))
        with torch.no_grad():
            model.log_prob(x)  # ActNorm's initialisation
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        with torch.no_grad():
            torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x))
        # The load hooks still run on the unpickled modules.
        loaded.load_state_dict(model.state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_glow_samples(dtype):
    torch.manual_seed(0)
    g = Glow((1, 4, 4), levels=2, steps=1, hidden=8, dequantize=True)
    with torch.no_grad():
        g.log_prob(torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8))
    g = g.to(dtype).eval()
    with torch.no_grad():
        images = g.sample(3)
    assert images.shape == (3, 1, 4, 4) and torch.isfinite(images.float()).all()


def test_linear_lu_half_inverse_matches_float32():
    torch.manual_seed(0)
    layer = flowkern.nn.LinearLU(5)
    z = torch.randn(4, 5)
    x32, _ = layer.inverse(z)
    x16, _ = layer.half().inverse(z.half())
    assert x16.dtype == torch.float16
    # The half inverse (float32 solves from the half factors, rounded once) vs the float64
    # inverse of the same half parameters and z, conditioned (tolerances.check_against: 4x the
    # half reference's own error, 8-ulp perturbations, 16 half ulps); was float32 within rtol / atol 2e-2.
    fn, params = layer_fn(layer, lambda m, v: (m.inverse(v)[0],))
    check_against("half LinearLU inverse", fn, (z.half(), *params), (x16,), torch.float16)


def test_coupling_with_data_of_another_dtype_names_the_problem():
    flow = RealNVP(6, layers=2, hidden=8)
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(TypeError, match=r"dtype of the layer's parameters \(torch.float32\)"):
            flow.log_prob(torch.randn(3, 6).to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast mixes dtypes on purpose
        assert torch.isfinite(flow.log_prob(torch.randn(3, 6))).all()


def test_dequantizing_models_follow_the_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        flow = RealNVP(6, layers=2, hidden=8, dequantize=True, norm="actnorm")
        vd = RealNVP(6, layers=2, hidden=8, dequantize="variational")
        px = torch.randint(0, 256, (4, 6), dtype=torch.uint8)
        assert flow.bits_per_dim(px).dtype == torch.float64
        assert torch.isfinite(vd.bits_per_dim(px)).all()
    finally:
        torch.set_default_dtype(old)
    assert flowkern.nn.DequantizeLogit().dtype == torch.float32


def test_actnorm_reset_initialization_initialises_again():
    a = flowkern.nn.ActNorm(3)
    a(torch.randn(64, 3))
    a.reset_initialization()
    assert not bool(a.initialized)
    x = torch.randn(64, 3) * 5 + 10
    y, _ = a(x)  # initialised from this batch
    check_actnorm_init(a, x, y)  # vs float64 statistics, the means' and stds' rounding (was atol 1e-5)
    assert bool(a.initialized)


def test_importance_log_prob_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    flow = RealNVP(6, layers=2, hidden=8, dequantize=True, norm="batchnorm")
    px = torch.randint(0, 256, (16, 6), dtype=torch.uint8)
    flow.train()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    flowkern.nn.importance_log_prob(flow, px, samples=4)
    assert flow.training
    for k, v in flow.state_dict().items():
        assert torch.equal(v, before[k]), k  # no running statistic moved


def test_sample_counts_accept_numpy_ints_and_refuse_the_rest():
    flow = RealNVP(6, layers=2, hidden=8)
    with torch.no_grad():
        assert flow.sample(np.int64(3)).shape == (3, 6)
        assert flow.base.sample(np.int32(2)).shape == (2, 6)
    for bad in (True, 2.0, -1, "3"):
        with pytest.raises(ValueError, match="n must be a non-negative int"):
            flow.sample(bad)
