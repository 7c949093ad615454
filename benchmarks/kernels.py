"""Per-op speed: flowkern's kernels vs the eager reference vs torch.compile(reference),
forward, inverse (where the op has one; --quick: the couplings' only, the sampling path) and
forward+backward, with effective bandwidth against clone() of the same bytes in the same run
(the roofline of these memory-bound ops)."""
from __future__ import annotations

from typing import Callable

import torch

import flowkern
from flowkern.ops import (actnorm, affine_coupling, batchnorm_flow_train, dequantize_logit,
                          dequantize_logit_inverse, gaussian_nll, rq_spline)
from flowkern.reference import actnorm_ref, affine_coupling_ref, rq_spline_ref
from flowkern.reference.batchnorm_flow import batchnorm_flow_train_ref
from flowkern.reference.dequantize import dequantize_logit_inverse_ref, dequantize_logit_ref
from flowkern.reference.gaussian_nll import gaussian_nll_ref

from .common import Row, compiled, interleaved_medians, markdown_table, median_time


def implementations(device: str, op: Callable, ref: Callable) -> dict[str, tuple[Callable, str]]:
    """name -> (function, backend to run it under): eager and compiled reference, flowkern."""
    impls = {"eager": (ref, "reference")}
    comp = compiled(ref, dynamic=False)
    if comp is not None:
        impls["compile"] = (comp, "reference")
    avail = flowkern.available_backends()
    native = "cpu" if device == "cpu" else "cuda"
    if native in avail:
        impls["flowkern"] = (op, native)
    if device == "cuda" and "triton" in avail:
        impls["flowkern-triton"] = (op, "triton")
    return impls


def _compare(suite: str, case: str, impls: dict, call: Callable, inputs: list, grads: tuple, backward: bool,
             device: str, budget_s: float, moved: int, clone_gbs: float) -> tuple[list[Row], list[list]]:
    """Times call(fn, *inputs) for every implementation (forward only, or forward plus
    autograd.grad of every floating input), interleaved, and returns result rows and table
    lines with ratios."""
    runs = {}
    for name, (fn, backend) in impls.items():
        if backward:
            args = [a.clone().requires_grad_() if a.is_floating_point() else a for a in inputs]
            leaves = [a for a in args if a.requires_grad]

            def run(fn=fn, args=args, leaves=leaves):
                return torch.autograd.grad(call(fn, *args), leaves, grads)
        else:
            def run(fn=fn):
                return call(fn, *inputs)
        runs[name] = (run, backend)
    times = interleaved_medians(runs, device, budget_s)
    rows, body = [], []
    for name, sec in times.items():
        gbs = moved / sec / 1e9
        extra = {"GB/s": gbs, "clone_fraction": gbs / clone_gbs, "vs_eager": times["eager"] / sec}
        for other in ("compile", "nflows"):
            if other in times:
                extra[f"vs_{other}"] = times[other] / sec
        rows.append(Row(suite, case, name, sec * 1e6, extra))
        body.append([case, name, sec * 1e6, extra["vs_eager"], extra.get("vs_compile", "-"),
                     extra.get("vs_nflows", "-"), gbs, f"{100 * extra['clone_fraction']:.0f}%"])
    return rows, body


HEADER = ["case", "impl", "median us", "x eager", "x compile", "x nflows", "GB/s", "of clone"]
DIRECTIONS = ("fwd", "inv", "fwd+bwd")


def _clone_roofline(x: torch.Tensor, device: str, budget_s: float) -> float:
    sec = median_time(lambda: x.clone(), device, budget_s)
    return 2 * x.numel() * x.element_size() / sec / 1e9


def affine_coupling_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    sizes = [(256, 392)] if quick else [(256, 392), (256, 784), (1024, 784), (4096, 3072)]
    if device == "cuda":
        sizes = [(256, 392), (4096, 784), (16384, 3072)] if quick else sizes + [(16384, 3072), (65536, 3072)]
    scales = ("sigmoid", "exp") if quick else ("sigmoid", "exp", "tanh")
    rows, body = [], []
    impls = implementations(device, affine_coupling, affine_coupling_ref)
    for b, d in sizes:
        gen = torch.Generator().manual_seed(0)
        x, t, s, gy = (torch.randn(b, d, generator=gen).to(device) for _ in range(4))
        gl = torch.randn(b, generator=gen).to(device)
        clone_gbs = _clone_roofline(x, device, budget_s)
        rows.append(Row("affine_coupling", f"B={b} D={d}", "clone", 0.0, {"GB/s": clone_gbs}))
        for scale in scales:
            for direction in DIRECTIONS:
                backward, inverse = direction == "fwd+bwd", direction == "inv"
                case = f"B={b} D={d} {scale} {direction}"
                moved = (9 if backward else 4) * x.numel() * x.element_size()  # the fused kernels' traffic
                r, lines = _compare("affine_coupling", case, impls,
                                    lambda fn, *a: fn(*a, scale=scale, inverse=inverse), [x, t, s],
                                    (gy, gl), backward, device, budget_s, moved, clone_gbs)
                rows += r
                body += lines
    table = "### affine_coupling (float32; GB/s counts the fused kernels' minimal traffic)\n\n" + markdown_table(
        HEADER, body)
    return rows, table


def _nflows_spline():
    """nflows' spline as (x, params) -> (y, per-row logdet), or None if nflows is absent."""
    try:
        from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline
    except ImportError:
        return None

    def nflows_rq(x, params, *, bins, bound, inverse=False):
        w, h, d = params[..., :bins], params[..., bins:2 * bins], params[..., 2 * bins:]
        y, lad = unconstrained_rational_quadratic_spline(x, w, h, d, inverse=inverse, tails="linear",
                                                         tail_bound=bound)
        return y, lad.reshape(x.shape[0], -1).sum(1)
    return nflows_rq


def saved_bytes(fn: Callable) -> int:
    """Bytes of the distinct tensors autograd saves for the backward while fn() runs."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def rq_spline_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    bins, bound = 8, 3.0
    sizes = [(256, 392)] if quick else [(256, 392), (256, 784)]
    rows, body = [], []
    impls = implementations(device, rq_spline, rq_spline_ref)
    nf = _nflows_spline()
    if nf is not None:
        impls["nflows"] = (nf, "reference")
    for b, d in sizes:
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(b, d, generator=gen) * 1.5).to(device)
        params = torch.randn(b, d, 3 * bins - 1, generator=gen).to(device)
        gy, gl = torch.randn(b, d, generator=gen).to(device), torch.randn(b, generator=gen).to(device)
        clone_gbs = _clone_roofline(params, device, budget_s)
        for direction in DIRECTIONS:
            backward, inverse = direction == "fwd+bwd", direction == "inv"
            case = f"B={b} D={d} K={bins} {direction}"
            p_bytes, x_bytes = params.numel() * params.element_size(), x.numel() * x.element_size()
            moved = (2 * p_bytes + 5 * x_bytes) if backward else (p_bytes + 2 * x_bytes)
            r, lines = _compare("rq_spline", case, impls,
                                lambda fn, *a: fn(*a, bins=bins, bound=bound, inverse=inverse), [x, params],
                                (gy, gl), backward, device, budget_s, moved, clone_gbs)
            rows += r
            body += lines
        # Memory: what each implementation keeps for the backward (B x D x bins tensors or not).
        for name, (fn, backend) in impls.items():
            if name == "compile":
                continue
            leaves = [x.clone().requires_grad_(), params.clone().requires_grad_()]
            with flowkern.backend(backend):
                nbytes = saved_bytes(lambda fn=fn: fn(*leaves, bins=bins, bound=bound))
            rows.append(Row("rq_spline", f"B={b} D={d} K={bins} saved", name, 0.0, {"saved_MB": nbytes / 2**20}))
            body.append([f"B={b} D={d} K={bins} saved for backward", name, "-", "-", "-", "-",
                         f"{nbytes / 2**20:.1f} MB", "-"])
    table = ("### rq_spline (float32, K=8 bins, bound 3; inputs and saved-for-backward bytes; "
             "nflows = unconstrained_rational_quadratic_spline)\n\n" + markdown_table(HEADER, body))
    return rows, table


# --------------------------------------------------------------- normalisation, preprocessing,
# likelihood: the elementwise work of a flow outside its couplings, at MNIST sizes.

def _mnist_shapes(device: str, quick: bool) -> list[tuple[int, ...]]:
    """(B, 784) as RealNVP sees MNIST and (B, 16, 14, 14) as Glow's first level does."""
    shapes = [(256, 784), (256, 16, 14, 14)]
    if not quick:
        shapes.append((1024, 784))
    if device == "cuda":
        shapes += [(4096, 784), (1024, 48, 16, 16)]
    return shapes


def _suite(suite: str, title: str, device: str, budget_s: float, impls: dict,
           cases: list[tuple[str, Callable, list, tuple, int, torch.Tensor]], inverse: bool = False
           ) -> tuple[list[Row], str]:
    """cases: (case, call(fn, *inputs, **flags), inputs, output grads, bytes moved by fwd+bwd, a
    tensor of x's size for the clone roofline). Each case runs forward, inverse (call with
    inverse=True) when `inverse`, then forward+backward."""
    rows, body = [], []
    for case, call, inputs, grads, moved, like in cases:
        clone_gbs = _clone_roofline(like, device, budget_s)
        for direction in DIRECTIONS if inverse else ("fwd", "fwd+bwd"):
            backward = direction == "fwd+bwd"
            label = f"{case} {direction}"
            nbytes = moved if backward else moved // 2
            run = (lambda fn, *a, call=call: call(fn, *a, inverse=True)) if direction == "inv" else call
            r, lines = _compare(suite, label, impls, run, inputs, grads, backward, device, budget_s, nbytes,
                                clone_gbs)
            rows += r
            body += lines
    return rows, f"### {title}\n\n" + markdown_table(HEADER, body)


def _shape_name(shape) -> str:
    return "x".join(map(str, shape))


def _channel_cases(device: str, quick: bool, call: Callable, passes: int) -> list:
    """Cases of a per-channel op (x, and two (C,) parameters) at MNIST shapes; `passes` is how
    many times the fused fwd+bwd reads or writes an x-sized tensor."""
    cases = []
    for shape in _mnist_shapes(device, quick):
        gen = torch.Generator().manual_seed(0)
        x, gy = (torch.randn(shape, generator=gen).to(device) for _ in range(2))
        p1, p2 = ((0.1 * torch.randn(shape[1], generator=gen)).to(device) for _ in range(2))
        gl = torch.randn(shape[0], generator=gen).to(device)
        cases.append((_shape_name(shape), call, [x, p1, p2], (gy, gl), passes * x.numel() * x.element_size(), x))
    return cases


def actnorm_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    cases = _channel_cases(device, quick, lambda fn, *a, **kw: fn(*a, **kw), 5)  # a = (x, shift, log_scale)
    return _suite("actnorm", "actnorm (float32; fwd+bwd includes the shift and log-scale gradients)", device,
                  budget_s, implementations(device, actnorm, actnorm_ref), cases, inverse=not quick)


def batchnorm_flow_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    """Training mode: batch statistics, normalisation and log-det, gradients through the statistics
    (no inverse: sampling runs batchnorm_flow with the running statistics, an actnorm-like pass)."""
    def train(fn, *a):  # a = (x, log_gamma, beta); (out, logdet) of (out, logdet, mean, var)
        out, ld = fn(*a)[:2]
        return out, ld

    return _suite("batchnorm_flow", "batchnorm_flow, training mode (float32; batch statistics, gradients "
                  "through them)", device, budget_s,
                  implementations(device, batchnorm_flow_train, batchnorm_flow_train_ref),
                  _channel_cases(device, quick, train, 7))


def dequantize_logit_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    """uint8 pixels to logits with the log-det. fwd: noise drawn by the op (flowkern: in the
    kernel from a seed; reference: the same counter-based noise in torch ops); fwd+bwd: given
    noise that needs its gradient (variational dequantization)."""
    impls = implementations(device, dequantize_logit, dequantize_logit_ref)
    inv_impls = implementations(device, dequantize_logit_inverse, dequantize_logit_inverse_ref)
    rows, body = [], []
    for shape in _mnist_shapes(device, quick)[:1] + ([(1024, 784)] if not quick else []):
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)
        noise = torch.rand(shape, generator=gen).to(device)
        gy, gl = torch.randn(shape, generator=gen).to(device), torch.randn(shape[0], generator=gen).to(device)
        clone_gbs = _clone_roofline(noise, device, budget_s)
        n = x.numel()
        r, lines = _compare("dequantize_logit", f"{_shape_name(shape)} fwd, seeded noise", impls,
                            lambda fn, xx: fn(xx, seed=1234), [x], (), False, device, budget_s, 5 * n, clone_gbs)
        rows += r
        body += lines
        r, lines = _compare("dequantize_logit", f"{_shape_name(shape)} fwd+bwd, given noise", impls,
                            lambda fn, xx, u: fn(xx, u), [x, noise], (gy, gl), True, device, budget_s, 17 * n,
                            clone_gbs)
        rows += r
        body += lines
        if quick:
            continue
        logits = (3 * torch.randn(shape, generator=gen)).to(device)
        r, lines = _compare("dequantize_logit", f"{_shape_name(shape)} inv (dequantize_logit_inverse)", inv_impls,
                            lambda fn, y: fn(y), [logits], (), False, device, budget_s, 8 * n, clone_gbs)
        rows += r
        body += lines
    title = ("dequantize_logit (uint8 in, float32 out; GB/s counts 1 byte per pixel in, 4 out; the inverse, "
             "--full only, reads float32 logits and writes float32 pixel values)")
    return rows, f"### {title}\n\n" + markdown_table(HEADER, body)


def gaussian_nll_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    cases = []
    for shape in _mnist_shapes(device, quick):
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(shape, generator=gen).to(device)
        ld, g = torch.randn(shape[0], generator=gen).to(device), torch.randn(shape[0], generator=gen).to(device)
        n = z.numel() * z.element_size()
        cases.append((_shape_name(shape), lambda fn, *a: fn(*a), [z, ld], (g,), 3 * n, z))
    return _suite("gaussian_nll", "gaussian_nll (float32; per-row negative log-likelihood under N(0, I) "
                  "minus the log-det)", device, budget_s, implementations(device, gaussian_nll, gaussian_nll_ref),
                  cases)
