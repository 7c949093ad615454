"""Memory-saving backprop (flowkern.nn.memory): the gradients equal standard backprop's (params,
input, context, incoming log-det) for deep RealNVP (affine, spline), Glow, conditional flows,
shared layers, BatchNormFlow in training mode, noise layers, under autocast and inside DDP; the
reconstruction drift is bounded; autograd saves at most 1/4 of standard backprop's activations.

Run as a script under torchrun, this file is the DDP worker of test_ddp_gloo."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from flowkern import models
from flowkern import nn as fnn
from flowkern.nn.memory import memory_saving_forward

from benchmarks.memory_saving import saved_activation_bytes
from tolerances import EPS, flow_logprob_rounding, flow_roundtrip_bound, make_case, stats_extra


def perturb(module: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Moves every coupling off the identity (their last conditioner layer starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "conditioner"):
                last = m.conditioner[-1]
                last.weight.add_(torch.randn(last.weight.shape, generator=gen, dtype=last.weight.dtype) * std)
                last.bias.add_(torch.randn(last.bias.shape, generator=gen, dtype=last.bias.dtype) * std)
    return module


def step(flow, x, context=None, memory_saving=False, seed=None):
    """-log_prob(x).sum() backward; returns {name: grad} over parameters, input and context."""
    flow.memory_saving = memory_saving
    flow.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    c = None if context is None else context.detach().clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    loss = -flow.log_prob(x, c).sum()
    loss.backward()
    out = {name: p.grad.clone() for name, p in flow.named_parameters() if p.grad is not None}
    if x.is_floating_point():
        out["<input>"] = x.grad.clone()
    if c is not None:
        out["<context>"] = c.grad.clone()
    return out, loss.detach()


def assert_grads_close(got: dict, ref: dict, rel: float) -> None:
    """Each gradient within rel of its own largest entry, plus a few rounding units of the
    largest gradient anywhere: a small bias gradient summed over the batch from much larger
    terms carries their absolute rounding (the fused coupling backward rounds differently)."""
    assert got.keys() == ref.keys(), (sorted(set(got) ^ set(ref)))
    overall = max(r.abs().max().item() for r in ref.values())
    for name in ref:
        scale = ref[name].abs().max().item() + 1e-12
        floor = 4 * torch.finfo(ref[name].dtype).eps * overall
        err = (got[name] - ref[name]).abs().max().item()
        assert err <= rel * scale + floor, f"{name}: max error {err:.3g} vs {rel:g} * max |grad| {scale:.3g} + {floor:.3g}"


def activation_bytes(fn, params) -> int:
    """Bytes of the distinct tensors autograd saves while fn() runs, parameters left out (a Linear
    saves its weight, which exists anyway): the benchmark's own measure."""
    return saved_activation_bytes(fn, list(params))


# ----------------------------------------------------------------------------- gradients match

@pytest.mark.parametrize("reuse", ["reuse", "verified", "no-reuse"])
@pytest.mark.parametrize("coupling", ["affine", "spline", "additive"])
def test_realnvp_depth_32_matches_standard_backprop(coupling, reuse, monkeypatch):
    """reuse: a coupling's inverse and recompute share one conditioner pass; verified: the
    same, comparing the conditioner inputs (as for couplings defined outside flowkern);
    no-reuse: inverse, then a full recompute."""
    from flowkern.nn import memory

    if reuse == "verified":
        monkeypatch.setattr(memory, "_builtin", lambda layer: False)
    elif reuse == "no-reuse":
        monkeypatch.setattr(memory, "_has_conditioner", lambda layer: False)
    torch.manual_seed(0)
    flow = perturb(models.RealNVP(16, 32, 16, coupling))
    x = torch.randn(8, 16)
    ref, loss_ref = step(flow, x)
    got, loss = step(flow, x, memory_saving=True)
    # The same forward's float32 terms summed twice (the memory-saving forward runs without
    # autograd): each sum within its rounding of the exact one, tolerances.flow_logprob_rounding
    # per row (was rtol 1e-6 / atol 1e-4).
    assert (loss - loss_ref).abs() <= 2 * flow_logprob_rounding(flow, x, EPS[torch.float32]).sum()
    assert_grads_close(got, ref, 1e-4)


def test_float64_matches_to_rounding_and_gradcheck():
    torch.manual_seed(0)
    flow = perturb(models.RealNVP(6, 4, 8, "spline", context=2), std=0.3).double()
    x, c = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    ref, _ = step(flow, x, c)
    got, _ = step(flow, x, c, memory_saving=True)
    assert_grads_close(got, ref, 1e-10)
    layers = list(flow.layers)

    def f(x, c, ld):
        z, logdet = memory_saving_forward(layers, x, c, ld)
        return z, logdet

    inputs = (x.clone().requires_grad_(), c.clone().requires_grad_(), torch.randn(5, dtype=torch.float64,
                                                                                    requires_grad=True))
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_conditional_flow_gradients_reach_the_context():
    torch.manual_seed(1)
    for coupling in ("affine", "spline"):
        flow = perturb(models.RealNVP(12, 8, 16, coupling, context=5))
        x, c = torch.randn(6, 12), torch.randn(6, 5)
        ref, _ = step(flow, x, c)
        got, _ = step(flow, x, c, memory_saving=True)
        assert got["<context>"].abs().max() > 0
        assert_grads_close(got, ref, 1e-4)


def test_glow_matches_including_the_actnorm_initialisation_step():
    torch.manual_seed(2)
    ref_model = perturb(models.Glow((2, 8, 8), levels=2, steps=2, hidden=8, context=3))
    ms_model = copy.deepcopy(ref_model)
    x, c = torch.randn(4, 2, 8, 8), torch.randn(4, 3)
    # First training step: the ActNorms initialise from this batch (checkpointed, not inverted).
    inputs = {id(ref_model): [], id(ms_model): []}
    hooks = [a.register_forward_pre_hook(lambda mod, args, key=id(model): inputs[key].append(args[0].detach().clone())
                                         if not bool(mod.initialized) else None)
             for model in (ref_model, ms_model) for a in model.modules() if isinstance(a, fnn.ActNorm)]
    ref, _ = step(ref_model, x, c)
    got, _ = step(ms_model, x, c, memory_saving=True)
    for h in hooks:
        h.remove()
    assert_grads_close(got, ref, 1e-4)
    # The same initialisation: the no-grad forward may round differently in the last bit, so
    # each ActNorm's batch h differs by |h - h'|; shift = -mean(h) moves by mean |h - h'| plus
    # the two sums' rounding (tolerances.stats_extra), log_scale = -log(sd + eps) by the
    # variance's (2 mean |h - mean| |h - h'| plus its rounding) over 2 sd (sd + eps), plus a few
    # ulps of the log (was rtol 1e-5 / atol 1e-6). Everything else is untouched: equal.
    eps = EPS[torch.float32]
    norms = [(a, b) for a, b in zip(ref_model.modules(), ms_model.modules()) if isinstance(a, fnn.ActNorm)]
    assert len(norms) == len(inputs[id(ref_model)]) == len(inputs[id(ms_model)]) > 0
    for (a, b), h, h2 in zip(norms, inputs[id(ref_model)], inputs[id(ms_model)]):
        h, dh = h.double(), (h.double() - h2.double()).abs()
        dims = (0,) + tuple(range(2, h.dim()))
        stats = stats_extra(make_case("batch_stats", dict(x=h)), eps, None)
        var, mean = torch.var_mean(h, dim=dims, correction=0)
        sd = var.sqrt()
        view = (1, -1) + (1,) * (h.dim() - 2)
        shift_bound = 2 * stats["out:0"] + dh.mean(dims)
        var_bound = 2 * stats["out:1"] + 2 * ((h - mean.view(view)).abs() * dh).mean(dims) + dh.pow(2).mean(dims)
        ls_bound = var_bound / (2 * sd * (sd + a.eps)) + 8 * eps * (1 + a.log_scale.detach().double().abs())
        assert ((a.shift - b.shift).double().abs() <= shift_bound).all()
        assert ((a.log_scale - b.log_scale).double().abs() <= ls_bound).all()
    norm_params = {id(p) for a, _ in norms for p in (a.shift, a.log_scale)}
    for (name, a), b in zip(ref_model.state_dict(keep_vars=True).items(), ms_model.state_dict().values()):
        if id(a) not in norm_params:
            assert torch.equal(a, b), name
    # Later steps: everything rebuilt by inverses, at every level of the multi-scale flow.
    x2 = torch.randn(4, 2, 8, 8)
    ref, _ = step(ref_model, x2, c)
    got, _ = step(ms_model, x2, c, memory_saving=True)
    assert_grads_close(got, ref, 1e-4)
    saved = activation_bytes(lambda: ms_model.log_prob(x2, c), ms_model.parameters())
    assert saved == x2.numel() * 4 + c.numel() * 4  # z and the context, nothing else


def test_shared_layer_used_twice_sums_its_gradients_and_hooks_fire_once():
    torch.manual_seed(3)
    shared = perturb(fnn.AffineCoupling(10, 12))
    flow = fnn.Flow([shared, fnn.Permutation(10, "reverse"), shared, fnn.LinearLU(10), shared])
    x = torch.randn(7, 10)
    calls = []
    shared.conditioner[0].weight.register_hook(lambda g: calls.append(1) or g * 2)
    ref, _ = step(flow, x)
    n_ref = len(calls)
    got, _ = step(flow, x, memory_saving=True)
    assert len(calls) - n_ref == n_ref  # as often as in standard backprop
    assert_grads_close(got, ref, 1e-5)


def test_batchnorm_in_training_mode_is_checkpointed_and_updates_its_statistics_once():
    torch.manual_seed(4)
    ref_model = perturb(models.RealNVP(12, 6, 16, norm="batchnorm"))
    ms_model = copy.deepcopy(ref_model)
    for _ in range(2):
        x = torch.randn(16, 12) * 2 + 1
        ref, _ = step(ref_model, x)
        got, _ = step(ms_model, x, memory_saving=True)
        assert_grads_close(got, ref, 1e-4)
    for (name, a), b in zip(ref_model.named_buffers(), ms_model.buffers()):
        assert torch.equal(a, b), name
    x = torch.randn(16, 12)
    saved = activation_bytes(lambda: ms_model.log_prob(x), ms_model.parameters())
    ref_model.log_prob(x)  # the same update of the running statistics
    norms = [m for m in ms_model.modules() if isinstance(m, fnn.BatchNormFlow)]
    # z and one stored input per BatchNormFlow (the last one's input shares no storage with z).
    assert saved <= (1 + len(norms)) * x.numel() * 4
    # In eval mode BatchNormFlow is exactly invertible: nothing but z is kept.
    ms_model.eval()
    ref_model.eval()
    assert activation_bytes(lambda: ms_model.log_prob(x), ms_model.parameters()) == x.numel() * 4
    ref, _ = step(ref_model, x)
    got, _ = step(ms_model, x, memory_saving=True)
    assert_grads_close(got, ref, 1e-4)


def test_dequantize_keeps_its_noise_and_the_rng_stream():
    torch.manual_seed(5)
    flow = perturb(models.RealNVP(16, 6, 16, dequantize=True))
    pixels = torch.randint(0, 256, (8, 16), dtype=torch.uint8)
    ref, loss_ref = step(flow, pixels, seed=11)
    after_ref = torch.rand(3)
    got, loss = step(flow, pixels, memory_saving=True, seed=11)
    after = torch.rand(3)
    torch.testing.assert_close(loss, loss_ref)
    assert torch.equal(after, after_ref)  # the backward walk drew nothing from the global RNG
    assert_grads_close(got, ref, 1e-4)


def test_variational_dequantization_replays_its_noise_for_its_parameters():
    vardeq = pytest.importorskip("flowkern.nn.vardeq")
    torch.manual_seed(12)
    flow = perturb(models.RealNVP(16, 4, 16, dequantize="variational"))
    assert isinstance(flow.layers[0], vardeq.VariationalDequantize)
    pixels = torch.randint(0, 256, (8, 16), dtype=torch.uint8)
    ref, _ = step(flow, pixels, seed=3)
    got, _ = step(flow, pixels, memory_saving=True, seed=3)
    assert any(name.startswith("layers.0.") for name in got)  # q's parameters got theirs
    assert_grads_close(got, ref, 1e-4)


class NoisyShift(fnn.FlowLayer):
    """y = x + scale * noise with fresh noise each call: a stochastic layer with a parameter and a
    float input, whose recompute must replay the forward's noise."""

    stochastic = True

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, context=None, logdet=None):
        y = x * (1 + self.scale) + self.scale * torch.randn_like(x)
        ld = torch.log1p(self.scale).expand(x.shape[0]) * x.shape[1]
        return y, ld if logdet is None else logdet + ld

    def inverse(self, z, context=None, logdet=None):
        raise AssertionError("a stochastic layer is never inverted by the memory-saving pass")


def test_a_stochastic_layer_with_float_input_replays_its_noise():
    torch.manual_seed(6)
    flow = fnn.Flow([perturb(fnn.AffineCoupling(8, 8)), NoisyShift(), perturb(fnn.AffineCoupling(8, 8, flip=True))])
    x = torch.randn(5, 8)
    ref, _ = step(flow, x, seed=3)
    got, _ = step(flow, x, memory_saving=True, seed=3)
    assert_grads_close(got, ref, 1e-5)


def test_incoming_logdet_gets_its_gradient_and_wrapper_matches():
    torch.manual_seed(7)
    layers = [perturb(fnn.SplineCoupling(8, 8, flip=i % 2 == 1)) for i in range(4)]
    x = torch.randn(6, 8)
    ld_in = torch.randn(6, requires_grad=True)
    wrapper = fnn.MemorySaving(*layers)
    z, ld = wrapper(x, None, ld_in)
    (z.sum() + (ld * torch.arange(6.0)).sum()).backward()
    assert torch.equal(ld_in.grad, torch.arange(6.0))
    # The wrapper inside an ordinary Flow, next to other layers, matches standard backprop.
    flow = fnn.Flow([fnn.Permutation(8, "random"), wrapper, fnn.LinearLU(8)])
    plain = fnn.Flow([flow.layers[0], *layers, flow.layers[2]])
    ref, _ = step(plain, x)
    got, _ = step(flow, x)
    assert_grads_close({k.replace("layers.1.layers.", "layers.X."): v for k, v in got.items()},
                       {_rename(k): v for k, v in ref.items()}, 1e-5)
    # Inverse and no-grad forward are the plain ones.
    with torch.no_grad():
        zz, _ = flow(x)
        err = (flow.inverse(zz)[0] - x).abs().double()
    # within z's rounding pulled back through the layers (tolerances.flow_roundtrip_bound; was atol 1e-5)
    assert (err <= flow_roundtrip_bound(flow, x, EPS[torch.float32])[0]).all()


def _rename(key: str) -> str:
    """layers.<1..4>.* of the plain flow -> layers.X.<0..3>.*; layers.5 -> layers.2."""
    parts = key.split(".")
    if parts[0] == "layers" and parts[1].isdigit():
        i = int(parts[1])
        if 1 <= i <= 4:
            return ".".join(["layers", "X", str(i - 1), *parts[2:]])
        if i == 5:
            return ".".join(["layers", "2", *parts[2:]])
    return key


def test_switch_changes_no_state_and_no_grad_forward_is_plain():
    a = models.RealNVP(8, 3, 8, memory_saving=True)
    b = models.RealNVP(8, 3, 8)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert models.Glow((1, 4, 4), levels=1, steps=1, hidden=4, memory_saving=True).memory_saving
    x = torch.randn(4, 8)
    with torch.no_grad():
        z, ld = a(x)
    assert z.grad_fn is None
    with pytest.raises(TypeError, match="memory_saving"):
        fnn.Flow([fnn.Permutation(4)], memory_saving="yes")


# ---------------------------------------------------------------------------------- autocast

class TorchAffineCoupling(fnn.FlowLayer):
    """An affine coupling in plain torch ops (runs under CPU autocast: the conditioner in bf16,
    the affine map in float32), recording the autocast state of every call."""

    def __init__(self, features: int, hidden: int, flip: bool):
        super().__init__()
        self.k, self.flip = features // 2, flip
        self.net = nn.Sequential(nn.Linear(self.k, hidden), nn.Tanh(), nn.Linear(hidden, 2 * (features - self.k)))
        self.states = []

    def _parts(self, x):
        a, b = x[:, :self.k], x[:, self.k:]
        return (b, a) if self.flip else (a, b)

    def _params(self, kept):
        self.states.append(torch.is_autocast_enabled("cpu"))
        shift, raw = self.net(kept).float().chunk(2, dim=1)
        return shift, torch.tanh(raw)

    def forward(self, x, context=None, logdet=None):
        kept, moved = self._parts(x)
        shift, log_s = self._params(kept)
        y = moved * log_s.exp() + shift
        out = torch.cat([y, kept] if self.flip else [kept, y], dim=1)
        ld = log_s.sum(1)
        return out, ld if logdet is None else logdet + ld

    def inverse(self, z, context=None, logdet=None):
        kept, moved = self._parts(z)
        shift, log_s = self._params(kept)
        x = (moved - shift) * (-log_s).exp()
        out = torch.cat([x, kept] if self.flip else [kept, x], dim=1)
        return out, -log_s.sum(1) if logdet is None else logdet - log_s.sum(1)


def test_autocast_bf16_recomputes_under_the_forwards_autocast_state():
    torch.manual_seed(8)
    layers = []
    for i in range(8):
        layers += [fnn.ActNorm(12), TorchAffineCoupling(12, 16, flip=i % 2 == 1), fnn.LinearLU(12)]
    flow = fnn.Flow(layers)
    x = torch.randn(32, 12)
    step(flow, x)  # ActNorm initialisation, in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flow.memory_saving = False
        lp_ref = flow.log_prob(x)
    assert lp_ref.dtype == torch.float32

    def autocast_step(memory_saving):
        flow.memory_saving = memory_saving
        flow.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = -flow.log_prob(xx).sum()
        loss.backward()  # outside the autocast region, as usual
        return {n: p.grad for n, p in flow.named_parameters()} | {"<input>": xx.grad}

    ref = autocast_step(False)
    coupling = layers[1]
    coupling.states.clear()
    got = autocast_step(True)
    assert coupling.states == [True, True, True]  # forward, inverse, recompute: all under autocast
    # bf16 conditioners: the recompute sees the forward's bf16 values up to float32 drift.
    for name in ref:
        err = (got[name] - ref[name]).norm() / (ref[name].norm() + 1e-12)
        assert err < 2e-2, (name, err.item())


def test_autocast_realnvp():
    """The couplings' conditioners run in bf16 under CPU autocast, their transforms in x's dtype."""
    flow = perturb(models.RealNVP(16, 4, 16))
    x = torch.randn(8, 16)
    ref, got = {}, {}
    for memory_saving, out in ((False, ref), (True, got)):
        flow.memory_saving = memory_saving
        flow.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = -flow.log_prob(x).sum()
        loss.backward()
        out.update({n: p.grad for n, p in flow.named_parameters()})
    for name in ref:
        assert (got[name] - ref[name]).norm() <= 2e-2 * (ref[name].norm() + 1e-12), name


# -------------------------------------------------------------------------- drift and memory

def reconstruction_drift(layers, x):
    """max |x_i - inverse chain from z| over the layer inputs x_i: what the backward walk rebuilds."""
    inputs = []
    with torch.no_grad():
        h = x
        for layer in layers:
            inputs.append(h)
            h, _ = layer(h)
        worst = []
        for layer, x_i in zip(reversed(layers), reversed(inputs)):
            h, _ = layer.inverse(h)
            worst.append(((h - x_i).abs().max() / x_i.abs().max()).item())
    return worst  # from the last layer's input back to the first


@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_reconstruction_drift_over_depth_32_is_bounded(coupling):
    torch.manual_seed(9)
    flow = perturb(models.RealNVP(64, 32, 32, coupling), std=0.05)
    x = torch.randn(64, 64)
    drift = reconstruction_drift(list(flow.layers), x)
    # Measured: affine 4e-7, spline 2.4e-6 relative at the first layer's input (float32 eps
    # 1.2e-7): rounding accumulates over the walk, far below what changes a gradient.
    assert max(drift) < 2e-5, drift
    assert max(reconstruction_drift(list(flow.double().layers), x.double())) < 1e-13


def test_keep_every_bounds_the_drift_of_ill_conditioned_inverses():
    """Steep splines amplify rounding in their inverse (~10-1000x per layer here: 4e-3 relative
    drift at depth 32, a 5e-3 gradient error); keeping every 4th input resets the walk."""
    torch.manual_seed(9)
    flow = perturb(models.RealNVP(64, 32, 32, "spline"), std=0.2)
    x = torch.randn(64, 64)
    ref, _ = step(flow, x)
    got, _ = step(flow, x, memory_saving=4)
    assert_grads_close(got, ref, 1e-4)
    kept = activation_bytes(lambda: flow.log_prob(x), flow.parameters())
    leaves = len(flow.layers)  # 34: permutation, 32 couplings, permutation
    assert kept == (1 + (leaves - 1) // 4) * x.numel() * 4  # z and the inputs of layers 4, 8, ..., 32
    with pytest.raises(TypeError, match="memory_saving"):
        fnn.Flow([fnn.Permutation(4)], memory_saving=0)
    with pytest.raises(ValueError, match="keep_every"):
        fnn.MemorySaving(fnn.Permutation(4), keep_every=0)


def test_saved_activations_at_depth_32_are_under_a_quarter_of_standard_backprop():
    torch.manual_seed(10)
    x = torch.randn(64, 32)
    for coupling in ("affine", "spline"):
        flow = perturb(models.RealNVP(32, 32, 32, coupling))
        flow.memory_saving = False
        standard = activation_bytes(lambda: flow.log_prob(x), flow.parameters())
        flow.memory_saving = True
        saving = activation_bytes(lambda: flow.log_prob(x), flow.parameters())
        assert saving <= standard / 4, (coupling, saving, standard)
        assert saving == x.numel() * 4  # only z: independent of depth
    try:  # the same, counted as benchmarks.kernels counts it (parameters included)
        from benchmarks.kernels import saved_bytes
    except ImportError:
        return
    flow.memory_saving = False
    standard = saved_bytes(lambda: flow.log_prob(x))
    flow.memory_saving = True
    assert saved_bytes(lambda: flow.log_prob(x)) <= standard / 4


# ------------------------------------------------------------------------------------------ DDP

def _ddp_worker(out_path: str) -> None:
    """Each rank: DDP over a memory-saving RealNVP on its own batch; the averaged gradients must
    equal standard backprop's on the mean of both ranks' losses, computed locally; and a few
    optimizer steps must keep every rank's parameters equal."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = perturb(models.RealNVP(12, 8, 16, "affine", context=3, norm="actnorm"))
    batches = [(torch.randn(8, 12), torch.randn(8, 3)) for _ in range(world)]
    ref(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))  # ActNorm init, same on all
    model = copy.deepcopy(ref)
    model.memory_saving = True
    ddp = DDP(model)
    x, c = batches[rank]
    (-_log_prob(ddp, x, c).mean()).backward()
    ref.zero_grad()
    (sum(-ref.log_prob(*b).mean() for b in batches) / world).backward()
    errors = []
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        errors.append((name, (p.grad - q.grad).abs().max().item() / (q.grad.abs().max().item() + 1e-12)))
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (-_log_prob(ddp, x, c).mean()).backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world": world, "max_rel_error": max(e for _, e in errors),
                       "worst": max(errors, key=lambda e: e[1])[0],
                       "ranks_equal": all(torch.equal(g, gathered[0]) for g in gathered)}, f)
    dist.destroy_process_group()


def _log_prob(ddp, x, c):
    """log_prob through DDP's forward (so its hooks are armed): z, logdet = ddp(x, c)."""
    z, logdet = ddp(x, c)
    return ddp.module.base.log_prob(z) + logdet


@pytest.mark.distributed
def test_ddp_gloo_two_ranks_matches_standard_backprop(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    result = json.loads(out.read_text())
    assert result["world"] == 2
    assert result["max_rel_error"] < 1e-4, result
    assert result["ranks_equal"]


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])


def test_affine_couplings_take_the_fused_backward_from_output(monkeypatch):
    """RealNVP's affine couplings (two-block masks) go back through one kernel pass each that
    rebuilds x from y (affine_coupling_merge_backward_from_output), not inverse + recompute."""
    ac = sys.modules["flowkern.ops.affine_coupling"]
    calls = []
    real = ac.affine_coupling_merge_backward_from_output

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ac, "affine_coupling_merge_backward_from_output", counting)
    flow = perturb(models.RealNVP(12, 4, 8))
    x = torch.randn(6, 12)
    got, _ = step(flow, x, memory_saving=True)
    assert len(calls) == 4
    ref, _ = step(flow, x, memory_saving=False)
    assert len(calls) == 4
    assert_grads_close(got, ref, 1e-4)
