"""Accuracy bounds from the problem, not from a CPU: the one place the tests take them from.

A kernel (or layer, or model) is compared with the float64 reference on the same inputs. Its
error may be at most
  - 2x the error of the reference run in the kernel's dtype (4x for the half types),
  - plus what perturbing every input (and the incoming gradients) by a few ulps of the kernel's
    dtype moves the float64 result: the problem's condition (cancellation, sums, points next to
    a knot), which no implementation can beat on rounded inputs,
  - plus 16 ulps of the exact value, and the few errors a kernel makes by design that no input
    perturbation shows (OpDef.extra, each saying why),
and a round trip inverse(forward(x)) at most what the rounding of the intermediate moves x:
that rounding pulled back by the inverse's slope (the *_roundtrip_tol functions, or, for layers
and models, `flow_roundtrip_bound`, which perturbs every intermediate and pulls it back in
float64). None of these depends on how a particular CPU rounds exp or log: they bound every
correctly rounded implementation, so the suite passes on AVX2, AVX-512 and the scalar build alike.

`check_agree` / `check_roundtrip` run one op case (a `Case`: float64 inputs exactly
representable in the case's dtype) through these checks; test_properties fuzzes them with
hypothesis, the per-op test files call them on their fixed inputs.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

import flowkern
from flowkern import ops
from flowkern import reference as R
from flowkern.reference.affine_coupling import affine_coupling_merge_ref
from flowkern.reference.batchnorm_flow import batchnorm_flow_train_ref
from flowkern.reference.rq_spline import find_bin, interval, spline_knots


def require(ok: bool, what: str = "the test's inputs are outside the op's valid range") -> None:
    """The validity filter of a fixed (not fuzzed) case: an invalid one is a bug of the test."""
    assert ok, what


def affine_roundtrip_bound(x, t, m, eps, inverse=False, tiny=0.0):
    """|x - back| elementwise for the affine coupling's round trip in a dtype of unit roundoff
    eps. Forward first: y = x m + t rounds to eps (|x m| + |t|), which going back divides by m;
    inverse first: y = (x - t) / m rounds to eps (|x| + |t|) / m, which going back multiplies
    by m. 16 ulps covers the few roundings on each side; `tiny` (the dtype's subnormal
    spacing) the intermediate's absolute floor, over the first map's slope."""
    x, t, m = (a.double() for a in (x, t, m))
    first = 1 / m if inverse else m
    return 16 * eps * (x.abs() + (t.abs() if inverse else t.abs() / m)) + 2 * tiny / first


def spline_roundtrip_bound(x, y, log_slope, bound, eps, tiny=0.0):
    """|F^-1(F(x)) - x| elementwise for the spline in a dtype of unit roundoff eps: y rounds to
    eps (|y| + bound) (the knots too, which the inverse rebuilds), and the inverse scales that by
    its slope, 1 / F'(x) = exp(-log_slope) (flat bins of F magnify it), beside x's own knots'
    rounding; 64 ulps covers the dozen roundings of the knots' cumulative sums and the root
    formula. `tiny` is the dtype's subnormal spacing, for flat bins near zero. No CPU's rounding
    enters: it bounds every correctly rounded implementation."""
    inv_slope = torch.exp(-log_slope)
    return 64 * eps * ((x.abs() + bound) + (y.abs() + bound) * inv_slope) + 2 * tiny * inv_slope


# Largest magnitude of any output, log-det or gradient for an input to count as valid in dtype.
LIMIT = {torch.float32: 1e36, torch.float64: 1e300, torch.bfloat16: 1e36, torch.float16: 6e3}


EPS = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


# The spacing of a dtype's subnormals: an intermediate that small keeps no relative precision.
TINY = {d: torch.finfo(d).smallest_normal * torch.finfo(d).eps for d in
        (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def compute_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def logdet_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def laid_out(t: torch.Tensor, layout: str, rows: int, broadcast: bool = False) -> torch.Tensor:
    """t's values in `layout`: a non-contiguous view, or (broadcast: its rows are equal) rows
    broadcast from the first with stride 0; tensors that cannot broadcast take the strided view."""
    if layout == "broadcast" and not broadcast:
        layout = "strided"
    if layout == "strided" and t.dim() >= 1 and t.numel() > 0:
        big = t.new_zeros(t.shape[:-1] + (2 * t.shape[-1],))
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "rowslice" and t.dim() >= 2:  # columns of a wider buffer: rows contiguous, apart
        big = t.new_zeros((t.shape[0], t.shape[1] + 3) + t.shape[2:])
        big[:, 1:1 + t.shape[1]] = t
        return big[:, 1:1 + t.shape[1]]
    if layout == "rowslice":
        layout = "strided"
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "broadcast" and t.dim() >= 1 and rows >= 2 and t.shape[0] == rows:
        return t[:1].expand(t.shape)
    return t.clone()


@dataclass
class Case:
    op: str
    shape: tuple
    dtype: torch.dtype
    layout: str
    seed: int
    tensors: Dict[str, torch.Tensor]  # float64 values exactly representable in their dtype (or uint8)
    kwargs: Dict[str, object] = field(default_factory=dict)
    broadcast: Tuple[str, ...] = ()  # tensors whose rows are equal: broadcast from row 0 in that layout

    def describe(self) -> str:
        mags = {k: (f"{v.abs().max().item():.3g}" if v.numel() and v.is_floating_point() else "-")
                for k, v in self.tensors.items()}
        return (f"{self.op} shape={self.shape} dtype={self.dtype} layout={self.layout} seed={self.seed} "
                f"kwargs={self.kwargs} max|.|={mags}")


@dataclass
class OpDef:
    name: str
    draw: Optional[Callable]  # (draw, backend, device) -> Case: test_properties sets it
    call: Callable  # (tensors, kwargs, reference: bool) -> tuple of outputs
    out_kinds: Tuple[str, ...]  # per output: "elem" (x's shape), "row" (B,), "chan" (C,), "pixel"
    row_args: Tuple[str, ...]  # tensors whose dim 0 is the batch
    grad_args: Tuple[str, ...]  # tensors the gradient is taken for
    main: str = "x"
    kernels: bool = True  # False: a reference op on every backend (no kernel to compare)
    inverse: Optional[Callable] = None  # (case, forward outputs) -> (tensors, kwargs) of the inverse call
    nan_check: Optional[Callable] = None  # (case, arg, poisoned mask, outputs) -> None, asserts
    coupled_rows: bool = False  # per-channel batch statistics: rows mix
    arg_dtype: Optional[Callable] = None  # (name, case) -> dtype of that input
    # (case, eps, exact result) -> {grad name: extra tolerance}: errors a kernel makes by design
    # that no input perturbation shows (the per-channel backwards read the rounded output).
    extra: Optional[Callable] = None
    # case -> {input name: absolute perturbation scale}: where an input's rounding acts at a scale
    # of its own (a softmax's logits: exp(p - max p) rounds like p moved by eps (1 + max |p|)).
    abs_perturb: Optional[Callable] = None


def default_arg_dtype(name: str, case: Case) -> torch.dtype:
    t = case.tensors[name]
    if not t.is_floating_point():
        return t.dtype
    if name == "logdet":
        return logdet_dtype(case.dtype)
    if name == "noise":
        return compute_dtype(case.dtype)
    return case.dtype


def quantized(case: Case, opdef: OpDef) -> Case:
    """Rounds every float tensor to its dtype, so the kernel and the float64 reference see the
    same numbers."""
    dt = opdef.arg_dtype or default_arg_dtype
    for k, v in list(case.tensors.items()):
        if v.is_floating_point():
            case.tensors[k] = v.to(dt(k, case)).double()
    return case


def broadcast_rows(case: Case, names: Sequence[str]) -> Case:
    """case, with the tensors `names` given equal rows in the broadcast layout."""
    if case.layout == "broadcast" and case.shape[0] >= 2:
        for k in names:
            if k in case.tensors:
                t = case.tensors[k]
                case.tensors[k] = t[:1].expand(t.shape).clone()
        case.broadcast = tuple(k for k in names if k in case.tensors)
    return case


def affine_call(t, kw, reference):
    fn = R.affine_coupling_ref if reference else ops.affine_coupling
    return fn(t["x"], t["shift"], t["scale_raw"], logdet=t.get("logdet"), **kw)


def affine_inverse(case, outs):
    t = dict(case.tensors)
    t["x"] = outs[0]
    t["logdet"] = None
    return t, dict(case.kwargs, inverse=not case.kwargs["inverse"])


def affine_roundtrip_tol(case, eps):
    """forward first: y = x m + t rounds to eps (|x m| + |t|), which going back divides by m;
    inverse first: y = (x - t) / m rounds to eps (|x| + |t|) / m, which going back multiplies by m."""
    x, t, kw = case.tensors["x"], case.tensors["shift"], case.kwargs
    if case.op == "additive_coupling":
        return 16 * eps * (x.abs() + t.abs()) + TINY[case.dtype]
    m = torch.exp(R.affine_coupling.log_scale_ref(case.tensors["scale_raw"], kw["scale"], kw["clamp"]))
    return affine_roundtrip_bound(x, t, m, eps, kw["inverse"], TINY[case.dtype])


def affine_scale_grad_error(x, t, s, kw, w, wl, eps):
    """d(log m)/ds is g (1 - g) / m for "sigmoid" (g = sigmoid(s + 2)) and 1 - tanh^2 for "tanh":
    where g or tanh rounds to within an ulp of 1 (s >~ 8) that difference keeps no relative
    accuracy, in the float32 reference's autograd as in the kernels (which take g from the
    saved factor m): an absolute error of eps times what multiplies it."""
    m = torch.exp(R.affine_coupling.log_scale_ref(s, kw["scale"], kw["clamp"]))
    wl = wl.reshape((-1,) + (1,) * (x.dim() - 1))
    size = w.abs() * (x.abs() * (m + 1 / m) + t.abs() / m) + wl.abs()
    if kw["scale"] == "sigmoid":
        size = size * (1 + 1 / m)
    return 16 * eps * size


def affine_extra(case: Case, eps: float, exact) -> Dict[str, torch.Tensor]:
    if case.kwargs["scale"] == "exp":
        return {}
    w, wl = loss_weights(case, exact.outs)[:2]
    return {"grad:scale_raw": affine_scale_grad_error(case.tensors["x"], case.tensors["shift"],
                                                      case.tensors["scale_raw"], case.kwargs, w, wl, eps)}


def merge_extra(case: Case, eps: float, exact) -> Dict[str, torch.Tensor]:
    if case.kwargs["scale"] == "exp":
        return {}
    c, k = case.tensors["x"].shape[1], case.tensors["kept"].shape[1]
    w, wl = loss_weights(case, exact.outs)[:2]
    w = w[:, k:] if case.kwargs["kept_first"] else w[:, :w.shape[1] - k]  # the transformed part's weights
    p = case.tensors["params"]
    err = affine_scale_grad_error(case.tensors["x"], p[:, :c], p[:, c:], case.kwargs, w, wl, eps)
    return {"grad:params": torch.cat([torch.zeros_like(err), err], dim=1)}


def affine_ld_scale(case):
    kw = case.kwargs
    if case.op == "additive_coupling":
        return torch.zeros(case.shape[0], dtype=torch.float64)
    logm = R.affine_coupling.log_scale_ref(case.tensors["scale_raw"], kw["scale"], kw["clamp"]).abs()
    return logm.flatten(1).sum(1) if logm.dim() > 1 else logm


def merge_call(t, kw, reference):
    fn = affine_coupling_merge_ref if reference else ops.affine_coupling_merge
    return fn(t["kept"], t["x"], t["params"], logdet=t.get("logdet"), **kw)


def merge_inverse(case, outs):
    k = case.tensors["kept"].shape[1]
    out = outs[0]
    kept, y = (out[:, :k], out[:, k:]) if case.kwargs["kept_first"] else (out[:, out.shape[1] - k:],
                                                                          out[:, :out.shape[1] - k])
    t = dict(case.tensors, kept=kept, x=y, logdet=None)
    return t, dict(case.kwargs, inverse=not case.kwargs["inverse"])


def merge_as_affine(case: Case) -> Case:
    c = case.tensors["x"].shape[1]
    p = case.tensors["params"]
    t = dict(case.tensors, shift=p[:, :c], scale_raw=p[:, c:])
    return Case("affine_coupling", case.shape, case.dtype, case.layout, case.seed, t,
                {k: v for k, v in case.kwargs.items() if k != "kept_first"})


def merge_roundtrip_tol(case, eps):
    return affine_roundtrip_tol(merge_as_affine(case), eps)


def merge_ld_scale(case):
    return affine_ld_scale(merge_as_affine(case))


def additive_call(t, kw, reference):
    fn = R.additive_coupling_ref if reference else ops.additive_coupling
    return fn(t["x"], t["shift"], logdet=t.get("logdet"), **kw)


def spline_call(t, kw, reference):
    fn = R.rq_spline_ref if reference else ops.rq_spline
    return fn(t["x"], t["params"], logdet=t.get("logdet"), **kw)


def spline_inverse(case, outs):
    t = dict(case.tensors)
    t["x"] = outs[0]
    t["logdet"] = None
    return t, dict(case.kwargs, inverse=not case.kwargs["inverse"])


def spline_slopes(case):
    """Per element of x: the first map's output and its log-slope (float64 reference)."""
    x, p, kw = case.tensors["x"], case.tensors["params"], case.kwargs
    y, ld = R.rq_spline_ref(x.reshape(-1), p.reshape(-1, p.shape[-1]), **kw)  # kw: bins, bound, inverse, style
    return y.reshape(x.shape), ld.reshape(x.shape)


def spline_roundtrip_tol(case, eps):
    """spline_roundtrip_bound at the case's elements (float64 reference slopes)."""
    x, kw = case.tensors["x"], case.kwargs
    y, log_slope = spline_slopes(case)
    return spline_roundtrip_bound(x, y, log_slope, bound_scale(kw["bound"]), eps, TINY[case.dtype])


SPLINE_STYLE_KEYS = ("min_width", "min_height", "min_derivative", "derivative", "slope", "tails")


def bound_scale(bound) -> float:
    """The size of the spline's interval's ends, max(|lo|, |hi|): the knots round at that scale."""
    lo, hi = interval(bound)
    return max(abs(lo), abs(hi))


def spline_bin_terms(case: Case):
    """(inside, terms): which elements lie in the interval, and the size (1 + d) / w of the
    terms d(log-slope)/dx is a difference of (w, h: the element's bin, d its knot slopes)."""
    x, p, kw = case.tensors["x"], case.tensors["params"], case.kwargs
    style = {k: v for k, v in kw.items() if k in SPLINE_STYLE_KEYS}
    xk, yk, dk = spline_knots(p, kw["bins"], kw["bound"], **style)
    lo, hi = interval(kw["bound"])
    inside = (x >= lo) & (x <= hi)
    v = torch.where(inside, x, torch.full_like(x, lo))
    k = find_bin(yk if kw["inverse"] else xk, v)

    def at(t, i):
        return t.gather(-1, i).squeeze(-1)

    w, h = at(xk, k + 1) - at(xk, k), at(yk, k + 1) - at(yk, k)
    d = at(dk, k) + at(dk, k + 1)
    return inside, torch.where(inside, (4 + d) * (1 / w + 1 / h) * (1 + w / h + h / w), torch.zeros_like(x))


def spline_extra(case: Case, eps: float, exact) -> Dict[str, torch.Tensor]:
    """The knots round to eps bound, which moves an output by eps bound (1 + its slope) even
    where the spline is the identity (no input perturbation shows that). d(log-slope)/dx is a
    difference of `terms` that cancels to 0 for the identity, leaving their rounding, which the
    float64 reference's autograd carries too (at bound 1e-30, 1 / w ~ 1e33)."""
    x = case.tensors["x"]
    if x.numel() == 0:
        return {}
    inside, terms = spline_bin_terms(case)
    _, log_slope = spline_slopes(case)
    wl = loss_weights(case, exact.outs)[1].reshape((-1,) + (1,) * (x.dim() - 1))
    bound = bound_scale(case.kwargs["bound"])
    out = torch.where(inside, 4 * eps * bound * (1 + torch.exp(log_slope)), torch.zeros_like(x))
    # Each parameter's gradient sums terms of size bound (the knots) times `terms` bound, which
    # cancel where the spline's shape does not depend on it.
    w_out = loss_weights(case, exact.outs)[0]
    params = 4 * eps * ((w_out.abs() * bound + wl.abs()) * terms * bound).unsqueeze(-1)
    return {"out:0": out, "grad:x": 64 * eps * wl.abs() * terms,
            "grad:params": params.expand(case.tensors["params"].shape)}


def spline_abs_perturb(case):
    p = case.tensors["params"]
    return {"params": 1 + p.abs().amax(-1, keepdim=True) if p.numel() else 0.0}


def spline_ld_scale(case):
    _, log_slope = spline_slopes(case)
    ls = log_slope.abs()
    return ls.flatten(1).sum(1) if ls.dim() > 1 else ls


def actnorm_call(t, kw, reference):
    fn = R.actnorm_ref if reference else ops.actnorm
    return fn(t["x"], t["shift"], t["log_scale"], logdet=t.get("logdet"), **kw)


def actnorm_roundtrip_tol(case, eps):
    """forward first: (x + t) e^s, back: y e^-s - t; inverse first: x e^-s - t, back: (y + t) e^s."""
    x, kw = case.tensors["x"], case.kwargs
    view = (1, -1) + (1,) * (x.dim() - 2)
    t = case.tensors["shift"].abs().reshape(view)
    s = case.tensors["log_scale"].reshape(view)
    if kw["inverse"]:
        t = t * torch.exp(s)
    return 16 * eps * (x.abs() + t) + 2 * TINY[case.dtype] * torch.exp(s if kw["inverse"] else -s)


def channel_ld_scale(case):
    """Every row's log-det is S * sum_c log m_c: its terms' magnitudes."""
    x = case.tensors["x"]
    spatial = math.prod(x.shape[2:])
    if case.op == "actnorm":
        a = case.tensors["log_scale"]
    else:
        a = case.tensors["log_gamma"] - 0.5 * torch.log(case.tensors["var"] + case.kwargs["eps"])
    return torch.full((case.shape[0],), float(spatial * a.abs().sum()), dtype=torch.float64)


def batchnorm_call(t, kw, reference):
    fn = R.batchnorm_flow_ref if reference else ops.batchnorm_flow
    return fn(t["x"], t["mean"], t["var"], t["log_gamma"], t["beta"], logdet=t.get("logdet"), **kw)


def batchnorm_roundtrip_tol(case, eps):
    """The first map (x - pre) m + post, the second (y - post) / m + pre: eps (|x| + |pre| + |post| / m)."""
    x, kw = case.tensors["x"], case.kwargs
    view = (1, -1) + (1,) * (x.dim() - 2)
    a = case.tensors["log_gamma"] - 0.5 * torch.log(case.tensors["var"] + kw["eps"])
    m = torch.exp(-a if kw["inverse"] else a).reshape(view)
    mean, beta = case.tensors["mean"].reshape(view), case.tensors["beta"].reshape(view)
    pre, post = (mean, beta) if not kw["inverse"] else (beta, mean)
    return 16 * eps * (x.abs() + pre.abs() + post.abs() / m) + 2 * TINY[case.dtype] / m


def bn_train_call(t, kw, reference):
    fn = batchnorm_flow_train_ref if reference else ops.batchnorm_flow_train
    return fn(t["x"], t["log_gamma"], t["beta"], logdet=t.get("logdet"), **kw)


def batch_stats_call(t, kw, reference):
    if reference:
        return R.batch_stats_ref(t["x"])
    with torch.no_grad():  # the kernel runs when no gradient is needed (else it is the reference)
        return ops.batch_stats(t["x"])


def nll_call(t, kw, reference):
    fn = R.gaussian_nll_ref if reference else ops.gaussian_nll
    return (fn(t["z"], t.get("logdet"), **kw),)


def deq_logit_call(t, kw, reference):
    kw = dict(kw)
    noise_dtype = compute_dtype(kw.pop("case_dtype"))
    noise = t.get("noise")
    if reference and noise is None:
        # The counter noise of the op's own compute dtype, also for a float64 reference run.
        noise = R.counter_uniform(t["x_uint8"].shape, kw.pop("seed"), noise_dtype).to(kw["dtype"])
    fn = R.dequantize_logit_ref if reference else ops.dequantize_logit
    return fn(t["x_uint8"], noise, logdet=t.get("logdet"), **kw)


def deq_logit_inverse_of(case, outs):
    return {"y": outs[0], "logdet": None}, dict(alpha=case.kwargs["alpha"])


def deq_inverse_extra(case: Case, eps: float, exact) -> Dict[str, torch.Tensor]:
    """A pixel is floor(256 v): where 256 v lies within rounding of an integer it may go either way."""
    y, alpha = case.tensors["y"], case.kwargs["alpha"]
    v256 = 256 * (torch.sigmoid(y) - alpha) / (1 - 2 * alpha)
    near = (v256 - v256.round()).abs() <= 256 * 64 * eps / (1 - 2 * alpha) * (1 + v256.abs() / 256)
    return {"out:0": near.double()}


def deq_inverse_call(t, kw, reference):
    fn = R.dequantize_logit_inverse_ref if reference else ops.dequantize_logit_inverse
    return fn(t["y"], logdet=t.get("logdet"), **kw)


def logit_call(t, kw, reference):
    fn = R.logit_ref if reference else ops.logit
    return fn(t["v"], logdet=t.get("logdet"), **kw)


def quantize_call(t, kw, reference):
    fn = R.quantize_ref if reference else ops.quantize
    return fn(t["v"], logdet=t.get("logdet"))


def dequantize_call(t, kw, reference):
    fn = R.dequantize_ref if reference else ops.dequantize
    return fn(t["x_uint8"], t["noise"], logdet=t.get("logdet"), **kw)


def dequantize_arg_dtype(name, case):
    if name == "noise":
        return compute_dtype(case.dtype)
    return default_arg_dtype(name, case)


def channel_extra(case: Case, eps: float, exact) -> Dict[str, torch.Tensor]:
    """Errors of the per-channel kernels that no input perturbation shows:
    - the backwards take their sums from the op's output rounded to its dtype
      (sum g (out - post)): eps |out| per element, T = sum |g out| per channel;
    - the factor m = exp(a) is computed from a rounded log-scale a: relative error eps |a|
      (a = log_gamma - log(var + eps) / 2 reaches -30 for var ~ 1e26);
    - training mode: x - mean rounds to eps (|x| + |mean|) apart from the statistics."""
    x, out = case.tensors["x"], exact.outs[0].double()
    w = loss_weights(case, exact.outs)[0]
    dims = [0] + list(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    T = 16 * eps * (w.abs() * out.abs()).sum(dims)
    if case.op == "actnorm":
        a = case.tensors["log_scale"].abs()
        post = case.tensors["shift"] if case.kwargs["inverse"] else torch.zeros_like(a)
    elif case.op == "batchnorm_flow":
        a = (case.tensors["log_gamma"] - 0.5 * torch.log(case.tensors["var"] + case.kwargs["eps"])).abs()
        post = case.tensors["mean"] if case.kwargs["inverse"] else case.tensors["beta"]
    else:
        var_b, _ = torch.var_mean(x, dim=dims, correction=0)
        a = (case.tensors["log_gamma"] - 0.5 * torch.log(var_b + case.kwargs["eps"])).abs()
        post = case.tensors["beta"]
    factor = 16 * eps * (1 + a).reshape(view)
    extra = {"out:0": factor * (out - post.reshape(view)).abs(), "grad:x": factor * exact.grads["x"].double().abs()}
    if case.op == "actnorm":
        extra["grad:log_scale"] = T
        return extra
    if case.op == "batchnorm_flow":
        extra.update({"grad:log_gamma": T, "grad:var": T * 0.5 / (case.tensors["var"] + case.kwargs["eps"])})
        return extra
    # Training mode: grad_x = (g + c0) m + k1 (y - beta), k1 ~ grad_log_gamma / (gamma sqrt(var + eps) n).
    var = var_b
    n = x.numel() // max(1, x.shape[1])
    q = torch.exp(-case.tensors["log_gamma"]) / torch.sqrt(var + case.kwargs["eps"]) / max(1, n)
    glg = exact.grads["log_gamma"].double().abs()
    gx = (q * (T + 16 * eps * glg)).reshape(view) * (out.abs() + case.tensors["beta"].abs().reshape(view))
    # x - mean rounds to eps (|x| + |mean|), and the statistics round apart from it: relative to
    # the normalised values, kappa = (|x| + |mean|) / sqrt(var + eps) per channel (the input
    # perturbations move x - mean and the variance together, and so miss it).
    mean = x.mean(dim=dims, keepdim=True)
    kappa = ((x.abs() + mean.abs()).amax(dim=dims) / torch.sqrt(var + case.kwargs["eps"])).reshape(view)
    extra["out:0"] = extra["out:0"] + 16 * eps * kappa * channel_max((out - case.tensors["beta"].reshape(view)).abs())
    extra["grad:x"] = extra["grad:x"] + gx + 16 * eps * kappa * channel_max(exact.grads["x"].double().abs())
    extra["grad:log_gamma"] = T + 16 * eps * kappa.reshape(-1) * (glg + T / (16 * eps))
    extra.update(stats_extra(case, eps, exact))
    return extra


def stats_extra(case: Case, eps: float, exact) -> Dict[str, torch.Tensor]:
    """A batch mean sums values of both signs: eps mean|x| (the variance: eps mean|x (x - mean)|),
    which sign patterns of input perturbations can happen to cancel."""
    x = case.tensors["x"]
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    at = 0 if case.op == "batch_stats" else 2
    return {f"out:{at}": 16 * eps * x.abs().mean(dim=dims),
            f"out:{at + 1}": 32 * eps * (x.abs() * (x - mean).abs()).mean(dim=dims)}


OPS: Dict[str, OpDef] = {
    "affine_coupling": OpDef("affine_coupling", None, affine_call, ("elem", "row"),
                             ("x", "shift", "scale_raw", "logdet"), ("x", "shift", "scale_raw", "logdet"),
                             inverse=affine_inverse, extra=affine_extra),
    "affine_coupling_merge": OpDef("affine_coupling_merge", None, merge_call, ("rows", "row"),
                                   ("kept", "x", "params", "logdet"), ("kept", "x", "params", "logdet"),
                                   inverse=merge_inverse, extra=merge_extra),
    "additive_coupling": OpDef("additive_coupling", None, additive_call, ("elem", "row"),
                               ("x", "shift", "logdet"), ("x", "shift", "logdet"), kernels=False,
                               inverse=affine_inverse),
    "rq_spline": OpDef("rq_spline", None, spline_call, ("elem", "row"), ("x", "params", "logdet"),
                       ("x", "params", "logdet"), inverse=spline_inverse, extra=spline_extra,
                       abs_perturb=spline_abs_perturb),
    "actnorm": OpDef("actnorm", None, actnorm_call, ("elem", "row"), ("x", "logdet"),
                     ("x", "shift", "log_scale", "logdet"), inverse=affine_inverse, extra=channel_extra),
    "batchnorm_flow": OpDef("batchnorm_flow", None, batchnorm_call, ("elem", "row"), ("x", "logdet"),
                            ("x", "mean", "var", "log_gamma", "beta", "logdet"), inverse=affine_inverse,
                            extra=channel_extra),
    "batchnorm_flow_train": OpDef("batchnorm_flow_train", None, bn_train_call,
                                  ("elem", "row", "chan", "chan"), ("x", "logdet"),
                                  ("x", "log_gamma", "beta", "logdet"), coupled_rows=True, extra=channel_extra),
    "batch_stats": OpDef("batch_stats", None, batch_stats_call, ("chan", "chan"), ("x",), (),
                         coupled_rows=True, extra=stats_extra),
    "gaussian_nll": OpDef("gaussian_nll", None, nll_call, ("row",), ("z", "logdet"), ("z", "logdet"), main="z"),
    "dequantize_logit": OpDef("dequantize_logit", None, deq_logit_call, ("elem", "row"),
                              ("x_uint8", "noise", "logdet"), ("noise", "logdet"), main="x_uint8",
                              inverse=deq_logit_inverse_of),
    "dequantize_logit_inverse": OpDef("dequantize_logit_inverse", None, deq_inverse_call,
                                      ("pixel", "row"), ("y", "logdet"), ("y", "logdet"), main="y",
                                      extra=deq_inverse_extra),
    "logit": OpDef("logit", None, logit_call, ("elem", "row"), ("v", "logdet"), ("v", "logdet"), main="v",
                   kernels=False),
    "quantize": OpDef("quantize", None, quantize_call, ("pixel", "row"), ("v", "logdet"), ("v", "logdet"),
                      main="v", kernels=False),
    "dequantize": OpDef("dequantize", None, dequantize_call, ("elem", "row"),
                        ("x_uint8", "noise", "logdet"), ("noise", "logdet"), main="x_uint8", kernels=False,
                        arg_dtype=dequantize_arg_dtype),
}


KERNEL_OPS = [name for name, o in OPS.items() if o.kernels]


REFERENCE_OPS = [name for name, o in OPS.items() if not o.kernels]


INVERTIBLE = ["affine_coupling", "affine_coupling_merge", "additive_coupling", "rq_spline", "actnorm", "batchnorm_flow", "dequantize_logit"]


@dataclass
class Result:
    outs: Tuple[torch.Tensor, ...]
    grads: Dict[str, Optional[torch.Tensor]]


def loss_weights(case: Case, outs) -> list:
    g = torch.Generator().manual_seed(case.seed + 1)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]


def run(opdef: OpDef, case: Case, backend: Optional[str], device: str, *, float64: bool = False,
        tensors: Optional[Dict[str, torch.Tensor]] = None, kwargs=None, grads: bool = True,
        weight_perturb: Optional[Callable] = None) -> Result:
    """Calls the op (backend given) or its reference (backend None) on the case's tensors, in the
    case's dtypes and layout, or all in float64 and contiguous (float64=True); returns the outputs
    and the gradients of a fixed random weighting of the differentiable outputs."""
    tensors = case.tensors if tensors is None else tensors
    kwargs = dict(case.kwargs if kwargs is None else kwargs)
    dt = opdef.arg_dtype or default_arg_dtype
    leaves, inputs = {}, {}
    for k, v in tensors.items():
        if v is None:
            continue
        if v.is_floating_point():
            target = torch.float64 if float64 else dt(k, case)
            leaf = v.to(device=device, dtype=target)
            if not float64:
                leaf = laid_out(leaf, case.layout, case.shape[0], k in case.broadcast)
            leaf = leaf.detach()
            if grads and k in opdef.grad_args:
                leaf.requires_grad_(True)
                leaves[k] = leaf
            inputs[k] = leaf
        else:
            inputs[k] = (laid_out(v.to(device), case.layout, case.shape[0], k in case.broadcast) if not float64
                         else v.to(device))
    if float64 and "dtype" in kwargs:
        kwargs["dtype"] = torch.float64
    if backend is None:
        outs = opdef.call(inputs, kwargs, True)
    else:
        with flowkern.backend(backend):
            outs = opdef.call(inputs, kwargs, False)
    outs = tuple(outs)
    result = Result(tuple(o.detach().cpu() for o in outs), {})
    if leaves:
        weights = loss_weights(case, outs)
        if weight_perturb is not None:
            weights = [weight_perturb(i, w) for i, w in enumerate(weights)]
        diff = [(o, w) for o, w, kind in zip(outs, weights, opdef.out_kinds)
                if o.requires_grad and kind != "pixel"]
        if diff:
            loss = sum((o.double() * w.to(device)).sum() for o, w in diff)
            got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            result.grads = {k: (None if g is None else g.detach().cpu()) for k, g in zip(leaves, got)}
    return result


def ref64(opdef, case, device="cpu", perturb: float = 0.0, sign=None, **kw) -> Result:
    """The float64 reference, optionally with every float input scaled by (1 + perturb * sign),
    and the incoming gradients by (1 + 8 eps_out * sign): in the op's dtype they are rounded."""
    tensors = case.tensors
    if perturb:
        w_eps = 8 * EPS[case.dtype]

        def weight_perturb(i, w):
            if isinstance(sign, float):
                return w * (1 + w_eps * sign)
            if sign == "rows":  # the outputs' weights apart: a gradient summing both may cancel
                return w * (1 + w_eps * (-1.0) ** i)
            g = torch.Generator().manual_seed(case.seed + 101 + i)
            return w * (1 + w_eps * torch.where(torch.rand(w.shape, generator=g, dtype=torch.float64) < 0.5,
                                                -1.0, 1.0))

        kw.setdefault("weight_perturb", weight_perturb)
        absolute = opdef.abs_perturb(case) if opdef.abs_perturb else {}
        tensors = {}
        for i, (k, v) in enumerate(case.tensors.items()):
            if v is not None and v.is_floating_point():
                if sign is None:  # random signs
                    s = torch.where(torch.rand(v.shape, generator=torch.Generator().manual_seed(case.seed + 7 + i),
                                               dtype=torch.float64) < 0.5, -1.0, 1.0)
                elif sign == "rows":  # alternating rows: moves batch statistics
                    s = (1.0 - 2.0 * (torch.arange(v.shape[0]) % 2)).reshape((-1,) + (1,) * (v.dim() - 1)) \
                        if v.dim() else 1.0
                else:
                    s = sign
                v = v * (1 + perturb * s) + perturb * s * absolute.get(k, 0.0)
            tensors[k] = v
        kw.setdefault("kwargs", {k: (_scaled(v, 1 + perturb * (sign if isinstance(sign, float) else 1.0))
                                     if k in PERTURBED_KWARGS else v) for k, v in case.kwargs.items()})
    return run(opdef, case, None, device, float64=True, tensors=tensors, **kw)


# Scalar arguments a kernel may hold in float32 (the spline's bound places every knot).
PERTURBED_KWARGS = ("bound", "eps", "alpha", "clamp")


def _scaled(v, factor):
    """A scalar argument times factor; a pair (the spline's (lo, hi)) end by end."""
    return tuple(e * factor for e in v) if isinstance(v, tuple) else v * factor


def all_finite(res: Result, opdef: OpDef, case: Case) -> None:
    for i, o in enumerate(res.outs):
        assert torch.isfinite(o).all(), f"{case.op}: output {i} not finite: {o[~torch.isfinite(o)][:5]}"
    for k, g in res.grads.items():
        if g is not None:
            assert torch.isfinite(g).all(), f"{case.op}: grad of {k} not finite: {g[~torch.isfinite(g)][:5]}"


def magnitude_ok(res: Result, dtype) -> bool:
    lim = LIMIT[dtype]
    for t in list(res.outs) + [g for g in res.grads.values() if g is not None]:
        if t.numel() and not (t.abs().max() <= lim):
            return False
    return True


def check_close(name: str, got: torch.Tensor, exact: torch.Tensor, lowp: torch.Tensor, cond: torch.Tensor,
                eps_out: float, atol: float, pixel: bool = False, group_last: bool = False,
                normwise: bool = False, group_channels: bool = False) -> None:
    """|got - exact| <= 2 |lowp - exact| + cond + 16 eps_out |exact| + atol elementwise, where
    cond is what perturbing the inputs by a few ulps moves the exact result. group_last: the
    reference's error is taken as the largest over the last dim (one element's parameters, whose
    gradients share their intermediate terms and so their rounding)."""
    got, exact, lowp = got.double(), exact.double(), lowp.double()
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    err = (got - exact).abs()
    ref_err = (lowp - exact).abs()
    if group_last and ref_err.numel():
        ref_err = ref_err.amax(-1, keepdim=True).expand_as(ref_err)
    if group_channels:  # values tied by batch statistics share their rounding
        ref_err = channel_max(ref_err)
    # normwise: 16 eps_out of the tensor's largest value, for the gradients of parameters every
    # row shares (sums over the batch): an element next to much larger ones carries their rounding.
    top = exact.abs().max() if normwise and exact.numel() else exact.new_zeros(())
    # Half types: the reference's own error is a noisier yardstick (2^-8 for bfloat16): 4x it.
    factor = 4 if eps_out >= EPS[torch.float16] else 2
    bound = factor * ref_err + cond + 16 * eps_out * torch.maximum(exact.abs(), top) + atol
    if pixel:
        bound = torch.maximum(bound, torch.where(cond > 0, 1.0, 0.0))
    bad = ~(err <= bound)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {err.numel()} off; worst err {err[bad].max().item():.3g}"
                           f" vs bound {bound[bad].min().item():.3g}; got {got[bad][:3].tolist()} "
                           f"exact {exact[bad][:3].tolist()}")


def condition(opdef, case, exact: Result, eps: float) -> Tuple[list, Dict[str, torch.Tensor]]:
    """Elementwise max over three input perturbations (all up, all down, random signs) of how
    far the float64 result moves: the error any algorithm may make on rounded inputs."""
    outs = [torch.zeros_like(o, dtype=torch.float64) for o in exact.outs]
    grads = {k: torch.zeros_like(g, dtype=torch.float64) for k, g in exact.grads.items() if g is not None}
    for sign in (1.0, -1.0, None, "rows"):
        p = ref64(opdef, case, perturb=8 * eps, sign=sign)
        for i, (a, b) in enumerate(zip(p.outs, exact.outs)):
            d = (a.double() - b.double()).abs()
            outs[i] = torch.maximum(outs[i], torch.nan_to_num(d, nan=math.inf, posinf=math.inf))
        for k in grads:
            if p.grads.get(k) is not None:
                d = (p.grads[k].double() - exact.grads[k].double()).abs()
                grads[k] = torch.maximum(grads[k], torch.nan_to_num(d, nan=math.inf, posinf=math.inf))
    return outs, grads


def channel_max(t: torch.Tensor) -> torch.Tensor:
    """Every element of a channel moves with its batch statistics: their largest move, for all."""
    if not t.numel():
        return t
    dims = [0] + list(range(2, t.dim()))
    return t.amax(dim=dims, keepdim=True).expand_as(t)


def check_finite_and_agree(opdef: OpDef, case: Case, backend: str, device: str, assume=require) -> None:
    case = quantized(case, opdef)
    exact = ref64(opdef, case)
    # The op's valid range: every exact output, log-det and gradient representable in its dtype.
    assume(magnitude_ok(exact, case.dtype))
    got = run(opdef, case, backend, device)
    all_finite(got, opdef, case)
    if backend == "reference" or not opdef.kernels:
        return
    lowp = run(opdef, case, None, device)
    eps = EPS[compute_dtype(case.dtype)]
    # In float64 the reference in the kernel's dtype is the exact one, no yardstick for a
    # different (and equally valid) order of operations in a cancellation: a relative 1e-10,
    # which still catches float32 accuracy in a float64 kernel (the 1e-3f constant: 5e-8).
    eps_out = EPS[case.dtype] if case.dtype != torch.float64 else 1e-10 / 16
    atol = 1e-6 if case.dtype != torch.float64 else 1e-12
    c_outs, c_grads = condition(opdef, case, exact, eps)
    # A per-row sum carries each term's own rounding, a few eps absolute for log terms of O(1)
    # (terms ~ n + |sum|). In float64 the reference in the kernel's dtype is the exact one and
    # cannot measure a summation order's error: allow its sqrt(n) growth.
    n = max(1, math.prod(case.shape[1:]))
    row_atol = 16 * eps * (n + exact.outs[1].double().abs() if len(exact.outs) > 1 else n)
    if case.dtype == torch.float64:
        row_atol = row_atol * math.sqrt(n)
    extra = opdef.extra(case, eps, exact) if opdef.extra else {}
    for i, kind in enumerate(opdef.out_kinds):
        cond = c_outs[i] + extra.get(f"out:{i}", 0)
        if opdef.coupled_rows and kind == "elem":
            cond = channel_max(cond)
        check_close(f"{case.op} output {i}", got.outs[i], exact.outs[i], lowp.outs[i], cond, eps_out,
                    atol + (row_atol if kind == "row" else 0), pixel=kind == "pixel",
                    group_channels=opdef.coupled_rows and kind == "elem")
    for k, g in got.grads.items():
        if g is not None and exact.grads.get(k) is not None:
            cond = c_grads[k] + extra.get("grad:" + k, 0)
            if opdef.coupled_rows and k == "x":
                cond = channel_max(cond)
            check_close(f"{case.op} grad {k}", g, exact.grads[k], lowp.grads[k], cond, eps_out, atol,
                        group_last=(case.op == "rq_spline" and k == "params"), normwise=k not in opdef.row_args,
                        group_channels=opdef.coupled_rows and k == "x")


ROUNDTRIP = {  # op: (tolerance of x, per-row magnitude of the log-det's terms)
    "affine_coupling": (affine_roundtrip_tol, affine_ld_scale),
    "additive_coupling": (affine_roundtrip_tol, affine_ld_scale),
    "affine_coupling_merge": (merge_roundtrip_tol, merge_ld_scale),
    "rq_spline": (spline_roundtrip_tol, spline_ld_scale),
    "actnorm": (actnorm_roundtrip_tol, channel_ld_scale),
    "batchnorm_flow": (batchnorm_roundtrip_tol, channel_ld_scale),
}


def check_roundtrip(opdef: OpDef, case: Case, backend: str, device: str, assume=require) -> None:
    case = quantized(case, opdef)
    exact = ref64(opdef, case, grads=False)
    assume(magnitude_ok(exact, case.dtype))
    with torch.no_grad():
        fwd = run(opdef, case, backend, device, grads=False)
        tensors, kwargs = opdef.inverse(case, fwd.outs)
        inv_case = Case(case.op, case.shape, case.dtype, case.layout, case.seed,
                        {k: v for k, v in tensors.items() if v is not None}, kwargs)
        if opdef.name == "dequantize_logit":
            back = run(OPS["dequantize_logit_inverse"], inv_case, backend, device, grads=False)
        else:
            back = run(opdef, inv_case, backend, device, grads=False)
    # The intermediate is rounded to the op's dtype: its epsilon bounds the round trip.
    eps = EPS[case.dtype]
    ld_in = case.tensors.get("logdet")
    ld_sum = fwd.outs[1].double() + back.outs[1].double() - (0 if ld_in is None else ld_in)
    if opdef.name == "dequantize_logit":
        x = case.tensors["x_uint8"].double()
        assert _pixels_near_edges(case, back.outs[0].double(), x, fwd.outs[0].double()), \
            "dequantize_logit round trip changed pixels away from cell edges"
        y = fwd.outs[0].double()
        n = math.prod(case.shape[1:])
        terms = (y.abs() + 80).flatten(1).sum(1) if y.dim() > 1 else y.abs() + 80
        # The inverse's log-det is taken at y rounded to the op's dtype: d/dy of it is at most 1.
        tol = 64 * EPS[compute_dtype(case.dtype)] * (terms + n * 6) / (1 - 2 * case.kwargs["alpha"])
        tol = tol + 2 * EPS[case.dtype] * (y.abs().flatten(1).sum(1) if y.dim() > 1 else y.abs())
        tol = tol + 64 * eps * (0 if ld_in is None else ld_in.abs())
        assert (ld_sum.abs() <= tol).all(), f"log-dets do not cancel: {(ld_sum.abs() - tol).max().item():.3g}"
        return
    x = case.tensors["x"]
    x_tol, ld_scale = ROUNDTRIP[opdef.name]
    bound = x_tol(case, eps) + (0 if case.dtype != torch.float16 else 2.0 ** -24)
    back_x = back.outs[0].double()
    if opdef.name == "affine_coupling_merge":  # back is the merge of (kept, x) again
        k = case.tensors["kept"].shape[1]
        kept_back, back_x = ((back_x[:, :k], back_x[:, k:]) if case.kwargs["kept_first"]
                             else (back_x[:, back_x.shape[1] - k:], back_x[:, :back_x.shape[1] - k]))
        assert torch.equal(kept_back, case.tensors["kept"]), "affine_coupling_merge: kept changed"
    err = (back_x - x).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{case.op}: inverse(forward(x)) off at {int(bad.sum())} elements, worst "
                           f"{err[bad].max().item():.3g} vs bound {bound[bad].min().item():.3g}; "
                           f"x {x[bad][:3].tolist()} back {back_x[bad][:3].tolist()}")
    # The log-dets cancel up to the rounding of their sums (and, for the spline, of how the
    # log-slope moves between x and the point the inverse lands on).
    n = math.prod(case.shape[1:])
    scale = ld_scale(case) + (0 if ld_in is None else ld_in.abs())
    if opdef.name == "rq_spline":
        # and the log-slope moves between x and where the inverse lands: |d log-slope / dx| |x' - x|
        _, terms = spline_bin_terms(case)
        moved = terms * err
        moved = moved.flatten(1).sum(1) if moved.dim() > 1 else moved
        tol = 2.0 ** 10 * eps * (scale + n + 1) + 4 * moved
    else:
        tol = 64 * eps * (scale + 1)
    assert (ld_sum.abs() <= tol).all(), f"{case.op}: log-dets do not cancel: {ld_sum.abs().max().item():.3g}"


def _pixels_near_edges(case, got, x, y) -> bool:
    """Pixels may move by one only where u lies within the rounding of the logit y (in the
    op's dtype) and of the arithmetic of a cell edge."""
    diff = (got - x).abs()
    if (diff > 1).any():
        return False
    u = case.tensors.get("noise")
    if u is None:
        u = R.counter_uniform(x.shape, case.kwargs["seed"], compute_dtype(case.dtype)).double()
    sig = torch.sigmoid(y)
    dv = 2 * EPS[case.dtype] * y.abs() * sig * (1 - sig) + 16 * EPS[compute_dtype(case.dtype)]
    margin = 256 * 4 * dv / (1 - 2 * case.kwargs["alpha"])
    near = (u < margin) | (u > 1 - margin)
    return bool(((diff == 0) | near).all())


# ------------------------------------------------------------------------------------------------
# Fixed cases (the per-op test files) and bespoke computations


def make_case(op: str, tensors: Dict[str, Optional[torch.Tensor]], kwargs=None, dtype=torch.float32,
              seed: int = 0, layout: str = "contiguous") -> Case:
    """A Case of the op on given inputs (any dtype, any device: taken to float64 on the CPU and
    rounded to `dtype` by the checks, so kernel and reference see the same numbers)."""
    t = {k: (v.detach().cpu().double() if v.is_floating_point() else v.detach().cpu())
         for k, v in tensors.items() if v is not None}
    main = OPS[op].main
    return Case(op, tuple(t[main].shape), dtype, layout, seed, t, dict(kwargs or {}))


def check_agree(op: str, tensors, kwargs=None, *, backend: str, device: str, dtype=torch.float32,
                seed: int = 0, layout: str = "contiguous") -> None:
    """The op on `backend` agrees with the float64 reference within the conditioned bound
    (test_properties' finite-and-agree property, on one fixed case)."""
    check_finite_and_agree(OPS[op], make_case(op, tensors, kwargs, dtype, seed, layout), backend, device)


def check_op_roundtrip(op: str, tensors, kwargs=None, *, backend: str, device: str, dtype=torch.float32,
                       seed: int = 0, layout: str = "contiguous") -> None:
    """inverse(forward(x)) within the intermediate's rounding pulled back by the inverse's slope,
    and the log-dets cancel within their sums' rounding (test_properties' round-trip property)."""
    check_roundtrip(OPS[op], make_case(op, tensors, kwargs, dtype, seed, layout), backend, device)


def _as_tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _perturbed_inputs(inputs, rel: float, sign, seed: int):
    out = []
    for i, a in enumerate(inputs):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            if sign is None:
                g = torch.Generator().manual_seed(seed + 7 + i)
                s = torch.where(torch.rand(a.shape, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
            else:
                s = sign
            a = a * (1 + rel * s)
        out.append(a)
    return out


def perturbation_moves(fn: Callable, inputs: Sequence, eps: float, seed: int = 0):
    """Elementwise, what the inputs' rounding to a dtype of unit roundoff eps can do to fn's
    exact (float64) outputs, to first order: for each float input in turn, the largest move when
    it alone is scaled by (1 + 8 eps s), s all +1, all -1 or random signs; summed over the inputs
    (independent roundings add at worst: the triangle inequality), so that no sign pattern of two
    inputs' perturbations can cancel where their roundings would not (x m + t next to 0)."""
    inputs64 = [a.detach().cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in inputs]
    exact = [o.detach().cpu().double() for o in _as_tuple(fn(*inputs64))]
    total = [torch.zeros_like(o) for o in exact]
    for j, a in enumerate(inputs64):
        if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
            continue
        moves = [torch.zeros_like(o) for o in exact]
        for sign in (1.0, -1.0, None):
            perturbed = list(inputs64)
            perturbed[j] = _perturbed_inputs([a], 8 * eps, sign, seed + 31 * j)[0]
            for i, (o, b) in enumerate(zip(_as_tuple(fn(*perturbed)), exact)):
                d = (o.detach().cpu().double() - b).abs()
                moves[i] = torch.maximum(moves[i], torch.nan_to_num(d, nan=math.inf, posinf=math.inf))
        total = [t + m for t, m in zip(total, moves)]
    return exact, total


def check_against(name: str, fn: Callable, inputs: Sequence, got, dtype, *, extra=(), atol: float = 0.0,
                  normwise: bool = False, names: Optional[Sequence[str]] = None,
                  in_dtypes: Optional[Sequence] = None) -> None:
    """Each of `got` (what a kernel, layer or model gave in `dtype` for fn(*inputs)) within the
    conditioned bound of check_close: 2x fn's own error run on the inputs in `dtype`, plus what
    8-ulp input perturbations move the float64 fn(*inputs), plus 16 ulps of the value, plus
    `extra` (per output: an analytic bound, documented where it is passed) and atol (likewise).
    fn must run in the dtype of its inputs; inputs are taken exactly as given, rounded to dtype
    (or to in_dtypes[i], where given and not None)."""
    eps = EPS[compute_dtype(dtype)]
    in_dtypes = list(in_dtypes) if in_dtypes is not None else [dtype] * len(inputs)  # e.g. a float32 log-det
    lowp_in = [a.detach().to(d or dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
               for a, d in zip(inputs, in_dtypes)]
    exact_in = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in lowp_in]
    exact, moves = perturbation_moves(fn, exact_in, eps)
    lowp = [o.detach().cpu().double() for o in _as_tuple(fn(*lowp_in))]
    got = [g.detach().cpu().double() for g in _as_tuple(got)]
    assert len(got) == len(exact), f"{name}: {len(got)} outputs, the reference gives {len(exact)}"
    extra = tuple(extra) + (0.0,) * (len(got) - len(tuple(extra)))
    for i, (g, e, lp, c, x) in enumerate(zip(got, exact, lowp, moves, extra)):
        label = f"{name} {names[i] if names else i}"
        check_close(label, g, e, lp, c + x, EPS[dtype], atol, normwise=normwise)


def sum_rounding(terms: torch.Tensor, eps: float, dims=None) -> torch.Tensor:
    """A sum of n terms in a dtype of unit roundoff eps (any order, any blocking): each partial
    sum rounds to eps times at most the sum of the magnitudes so far, n eps sum |terms| worst
    case; blocked and pairwise orders (every kernel here) make it eps log2(n) sum |terms|, and
    a 4x margin for the terms' own rounding."""
    a = terms.detach().cpu().double().abs()
    if dims is None:
        dims = tuple(range(1, a.dim()))
    n = max(1, math.prod(a.shape[d] for d in dims)) if dims else 1
    return 4 * eps * (math.log2(n) + 1) * (a.sum(dims) if dims else a)


def layer_fn(layer: torch.nn.Module, run_fn: Callable, backend: str = "reference"):
    """(fn, params) for check_against on a layer or model: fn(x, *params) runs run_fn(module, x)
    (returning a tuple of tensors: outputs, log-dets, gradients) on a copy of `layer` in x's
    dtype whose parameters are `params`, under `backend`. The parameters are inputs like x:
    check_against rounds them, runs the float64 copy exactly and perturbs them by 8 ulps (what
    a matmul's rounding does is a relative perturbation of its weights of that order)."""
    def fn(x, *params):
        m = copy.deepcopy(layer).to(x.dtype)
        with torch.no_grad():
            for p, v in zip(m.parameters(), params):
                p.copy_(v)
        with flowkern.backend(backend):
            return tuple(run_fn(m, x))
    return fn, [p.detach().cpu() for p in layer.parameters()]


def _leaf_flow_layers(module: torch.nn.Module):
    from flowkern.nn.flow import FlowLayer
    out = []
    for m in module.modules():
        if isinstance(m, FlowLayer) and not any(isinstance(c, FlowLayer) for c in m.modules() if c is not m):
            out.append(m)
    return out


def _perturb(h: torch.Tensor, rel: float, sign, absolute: float, gen: torch.Generator) -> torch.Tensor:
    if sign is None:
        s = torch.where(torch.rand(h.shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    else:
        s = sign
    # moved by rel (|h| + absolute) in the direction s (h (1 + rel s) + rel s absolute would cancel for h = -absolute)
    return h + rel * s * (h.abs() + absolute)


def flow_roundtrip_bound(layer: torch.nn.Module, x: torch.Tensor, eps: float, context=None):
    """(x bound, log-det bound), elementwise / per row, for inverse(forward(x)) of a layer or a
    whole flow run in a dtype of unit roundoff eps.

    To first order, a rounding d_k of the intermediate h_k (the output of the k-th elementary
    layer, going either way) comes back as J_{1..k}^-1 d_k: the inverse of the layers before it
    applied to it. This measures exactly that in float64: every elementary layer's output
    scaled by (1 + 8 eps s) (plus 8 eps s times the spline's bound: its knots round at that
    scale), in the forward pass, then in the inverse pass, s all +1, all -1 or random signs,
    and the largest move of the float64 round trip is taken, 2x; plus 16 eps |x| (x's own
    rounding). The log-dets: how far the same perturbations move ld_forward + ld_inverse (the
    log-slopes taken at moved points), 2x, plus 16 eps per elementary layer and direction times
    (its terms' count + |its log-det|): the rounding of a sum of n log terms of O(1), the row
    rule of check_finite_and_agree. No CPU's rounding enters, and the bound does not collapse where a float32
    round trip happens to come back exact."""
    m = copy.deepcopy(layer).cpu().double()
    x64 = x.detach().cpu().double()
    ctx = None if context is None else context.detach().cpu().double()
    leaves = _leaf_flow_layers(m)
    rel = 8 * eps
    with torch.no_grad(), flowkern.backend("reference"):
        y, ld_f = m(x64, ctx)
        base, ld_i = m.inverse(y, ctx)
        base_sum = ld_f + ld_i
        # The per-layer log-det increments, for their sums' rounding.
        increments = []
        hooks = [leaf.register_forward_hook(lambda mod, args, out: increments.append(
            (out[1] - (args[2] if len(args) > 2 and args[2] is not None else 0), out[0][0].numel()))
            if isinstance(out, tuple) else None) for leaf in leaves]
        m(x64, ctx)
        for h in hooks:
            h.remove()
        x_move = torch.zeros_like(x64)
        ld_move = torch.zeros_like(base_sum)
        for direction in ("forward", "inverse"):
            for si, sign in enumerate((1.0, -1.0, None)):
                gen = torch.Generator().manual_seed(1234 + si)
                undo = []
                for leaf in leaves:
                    absolute = float(getattr(leaf, "bound", 0.0) or 0.0)
                    if direction == "forward":
                        def hook(mod, args, out, absolute=absolute, gen=gen, sign=sign):
                            return (_perturb(out[0], rel, sign, absolute, gen),) + tuple(out[1:])
                        undo.append(leaf.register_forward_hook(hook).remove)
                    else:
                        def inv(*a, _orig=leaf.inverse, absolute=absolute, gen=gen, sign=sign, **k):
                            out = _orig(*a, **k)
                            return (_perturb(out[0], rel, sign, absolute, gen),) + tuple(out[1:])
                        leaf.inverse = inv
                        undo.append(lambda leaf=leaf: delattr(leaf, "inverse"))
                yp, ldp_f = m(x64, ctx)
                back, ldp_i = m.inverse(yp, ctx)
                for u in undo:
                    u()
                x_move = torch.maximum(x_move, torch.nan_to_num((back - base).abs(), nan=math.inf))
                ld_move = torch.maximum(ld_move, torch.nan_to_num((ldp_f + ldp_i - base_sum).abs(), nan=math.inf))
    x_bound = 2 * x_move + 16 * eps * x64.abs()
    sums = sum((32 * eps * (n + d.abs()) for d, n in increments), torch.zeros_like(base_sum))
    return x_bound, 2 * ld_move + sums + base_sum.abs()


def check_flow_roundtrip(layer: torch.nn.Module, x: torch.Tensor, context=None):
    """inverse(forward(x)) == x and ld_inverse == -ld_forward for the layer in x's dtype (on the
    current backend), within flow_roundtrip_bound."""
    y, ld = layer(x, context)
    x2, ld_inv = layer.inverse(y, context)
    assert x2.shape == x.shape and ld.shape == (x.shape[0],)
    x_bound, ld_bound = flow_roundtrip_bound(layer, x, EPS[compute_dtype(x.dtype)], context)
    err = (x2.detach().cpu().double() - x.detach().cpu().double()).abs()
    bad = ~(err <= x_bound)
    assert not bad.any(), (f"round trip: {int(bad.sum())} of {err.numel()} off; worst err {err[bad].max():.3g} "
                           f"vs bound {x_bound[bad].min():.3g}")
    ld_err = (ld.detach().cpu().double() + ld_inv.detach().cpu().double()).abs()
    assert (ld_err <= ld_bound).all(), f"log-dets do not cancel: {ld_err.max():.3g} vs bound {ld_bound.min():.3g}"
    return y, ld


def flow_logprob_rounding(layer: torch.nn.Module, x: torch.Tensor, eps: float, context=None) -> torch.Tensor:
    """Per row, what summing a flow's log_prob = -sum z^2 / 2 - D log(2 pi) / 2 + logdet rounds to
    in a dtype of unit roundoff eps, in any order: tolerances.sum_rounding of the terms z^2 / 2,
    the constant and the log-det, plus every elementary layer's own log-det sum, 16 eps (its
    terms' count + |its log-det|) (check_finite_and_agree's row rule). Input perturbations need
    not show it: where the terms cancel, no sign pattern of theirs does. Taken from the float64
    flow (x and the layer as given)."""
    m = copy.deepcopy(layer).cpu().double()
    x64 = x.detach().cpu().double()
    ctx = None if context is None else context.detach().cpu().double()
    increments = []
    hooks = [leaf.register_forward_hook(lambda mod, args, out: increments.append(
        (out[1] - (args[2] if len(args) > 2 and args[2] is not None else 0), out[0][0].numel()))
        if isinstance(out, tuple) else None) for leaf in _leaf_flow_layers(m)]
    try:
        with torch.no_grad(), flowkern.backend("reference"):
            z, ld = m(x64, ctx)
    finally:
        for h in hooks:
            h.remove()
    z = z.flatten(1)
    const = torch.full_like(ld, 0.5 * z.shape[1] * math.log(2 * math.pi))
    terms = torch.cat([z ** 2 / 2, const[:, None], ld[:, None]], 1)
    layers = sum((16 * eps * (n + d.abs()) for d, n in increments), torch.zeros_like(ld))
    return sum_rounding(terms, eps) + layers


def check_actnorm_init(layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """An ActNorm initialised from the batch x (its output y on it) against float64 statistics:
    shift = -mean, log_scale = -log(sd + eps) through check_against plus the statistics' sums'
    rounding (stats_extra: 16 eps mean|x| for the mean, 32 eps mean|x (x - mean)| for the
    variance, the latter through d/dvar = 1 / (2 sd (sd + eps))); y's channel means vanish within
    each y = (x + shift) e^s's rounding, a few eps (|x| + |shift|) e^s, and the mean of n of them
    within sum_rounding / n of |y|; y's channel std is sd / (sd + eps) (float64) within the RMS
    of y's elementwise error: that rounding plus what the layer's parameters' (checked) errors
    move it (std is 1-Lipschitz in the RMS norm)."""
    eps = EPS[torch.float32]
    dims = (0,) + tuple(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)

    def init(v):
        var, mean = torch.var_mean(v, dim=dims, correction=0)
        return -mean, -torch.log(var.sqrt() + layer.eps)

    xd = x.detach().double().cpu()
    stats = stats_extra(make_case("batch_stats", dict(x=xd)), eps, None)
    var64, mean64 = torch.var_mean(xd, dim=dims, correction=0)
    sd = var64.sqrt()
    check_against("actnorm init", init, (x.cpu(),), (layer.shift, layer.log_scale), torch.float32,
                  extra=(stats["out:0"], stats["out:1"] / (2 * sd * (sd + layer.eps))), names=("shift", "log_scale"))
    shift = layer.shift.detach().double().cpu().view(view)
    s = layer.log_scale.detach().double().cpu().view(view)
    yd = y.detach().double().cpu()
    n = yd.numel() // yd.shape[1]
    rounding = 16 * eps * (xd.abs() + shift.abs()) * s.exp()
    sums = sum_rounding(yd.transpose(0, 1).reshape(yd.shape[1], -1), eps) / n
    assert (yd.mean(dims).abs() <= rounding.mean(dims) + sums).all(), "actnorm init: channel means do not vanish"
    # y vs the float64 normalised batch (x - mean) / (sd + eps): rounding, plus the parameters' errors
    s64 = -torch.log(sd + layer.eps).view(view)
    err = (rounding + s.exp() * (shift + mean64.view(view)).abs()
           + (xd - mean64.view(view)).abs() * (s.exp() - s64.exp()).abs())
    rms = err.pow(2).mean(dims).sqrt()
    want = sd / (sd + layer.eps)
    got = yd.std(dims, unbiased=False)
    assert ((got - want).abs() <= rms + 16 * eps * want).all(), \
        f"actnorm init: channel std {got.tolist()} vs {want.tolist()}, bound {rms.tolist()}"


def batchnorm_train_error(layer: torch.nn.Module, x: torch.Tensor):
    """(err, |y - beta|) elementwise for a BatchNormFlow in training mode on x (float64 values):
    what no input perturbation shows of y's error, the statistics' sums' rounding (stats_extra)
    moved through the map, and x - mean rounding to eps (|x| + |mean|) apart from the
    statistics: kappa = max (|x| + |mean|) / sqrt(var + eps) per channel relative to the
    normalised values (channel_extra's training terms)."""
    eps = EPS[torch.float32]
    view = (1, -1) + (1,) * (x.dim() - 2)
    xd = x.detach().double().cpu()
    dims = (0,) + tuple(range(2, x.dim()))
    var, mean = torch.var_mean(xd, dim=dims, correction=0)
    stats = stats_extra(make_case("batch_stats", dict(x=xd)), eps, None)
    m = (layer.log_gamma.detach().double().cpu().exp() / torch.sqrt(var + layer.eps)).view(view)
    y0 = ((xd - mean.view(view)) * m).abs()
    kappa = ((xd.abs() + mean.abs().view(view)).amax(dim=dims) / torch.sqrt(var + layer.eps)).view(view)
    err = (m * stats["out:0"].view(view) + y0 * (stats["out:1"] / (2 * (var + layer.eps))).view(view)
           + 16 * eps * kappa * channel_max(y0))
    return err, y0


def check_batchnorm_against_torch(name: str, layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """y = BatchNormFlow(x) (training: the batch's statistics, before its running-statistics
    update; eval: the running ones) vs the float64 F.batch_norm (torch's BatchNorm, the same
    map with weight exp(log_gamma)) through check_against, x and the layer's parameters and
    running statistics perturbed by 8 ulps. Training mode besides: the statistics' sums'
    rounding (stats_extra) moved through the map, and x - mean rounding to eps (|x| + |mean|)
    apart from the statistics, kappa = max (|x| + |mean|) / sqrt(var + eps) per channel
    relative to the normalised values (channel_extra's training terms): no input perturbation
    shows either."""
    import torch.nn.functional as F
    eps = EPS[torch.float32]
    lg, beta = layer.log_gamma.detach().cpu(), layer.beta.detach().cpu()
    view = (1, -1) + (1,) * (x.dim() - 2)
    if layer.training:
        def fn(v, lg, b):
            return F.batch_norm(v, None, None, lg.exp(), b, training=True, eps=layer.eps)

        extra = (batchnorm_train_error(layer, x)[0],)
        check_against(name, fn, (x.cpu(), lg, beta), (y,), torch.float32, extra=extra)
    else:
        def fn(v, rm, rv, lg, b):
            return F.batch_norm(v, rm, rv, lg.exp(), b, training=False, eps=layer.eps)

        check_against(name, fn, (x.cpu(), layer.running_mean.cpu(), layer.running_var.cpu(), lg, beta), (y,),
                      torch.float32)


def shift_moves(fn: Callable, inputs: Sequence, shifts: Sequence) -> list:
    """Per output of fn, elementwise: how far moving each input by +-shifts[i] (absolute; None:
    not moved) moves the float64 fn(*inputs), the larger way, summed over the inputs: for an
    input whose rounding acts at a scale of its own (the noise u enters through x + u, which
    rounds at eps (x + u), not eps u), the move check_against's relative perturbations miss."""
    inputs64 = [a.detach().cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in inputs]
    exact = [o.detach().cpu().double() for o in _as_tuple(fn(*inputs64))]
    total = [torch.zeros_like(o) for o in exact]
    for j, d in enumerate(shifts):
        if d is None:
            continue
        for s in (1.0, -1.0):
            moved = list(inputs64)
            moved[j] = inputs64[j] + s * torch.as_tensor(d, dtype=torch.float64)
            outs = [o.detach().cpu().double() for o in _as_tuple(fn(*moved))]
            if s == 1.0:
                up = [(o - e).abs() for o, e in zip(outs, exact)]
            else:
                total = [t + torch.maximum(a, (o - e).abs()) for t, a, o, e in zip(total, up, outs, exact)]
    return total
