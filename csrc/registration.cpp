// Schemas of the flowkern torch ops and their CUDA implementations. Importing flowkern._C runs
// these registrations; the CPU implementations register from the capability module flowkern
// loads next (csrc/cpu/module.cpp), and the fake (meta) implementations used by torch.compile
// live in Python (flowkern/ops), beside the autograd wiring.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(flowkern, m) {
  // (out, logdet, factor): factor = m (or 1/m going back) when save_factor, else empty.
  m.def("affine_coupling_fwd(Tensor x, Tensor shift, Tensor scale_raw, int mode, float clamp, bool inverse, "
        "Tensor? logdet, bool save_factor) -> (Tensor, Tensor, Tensor)");
  // (grad_in, grad_scale_raw) from the raw scale, or from the saved factor when is_factor.
  m.def("affine_coupling_bwd(Tensor grad_out, Tensor? grad_logdet, Tensor saved, Tensor scale_or_factor, "
        "bool is_factor, int mode, float clamp, bool inverse) -> (Tensor, Tensor)");
  // A coupling layer's transform and merge in one pass: x (B, n) transformed by params (B, 2n) =
  // [shift | raw scale], written beside kept (B, k) into out (B, k + n) (kept first or last).
  // Inputs may be views with contiguous rows at any row stride. (out, logdet, factor).
  m.def("affine_coupling_merge_fwd(Tensor kept, Tensor x, Tensor params, int mode, float clamp, bool inverse, "
        "Tensor? logdet, bool save_factor, bool kept_first) -> (Tensor, Tensor, Tensor)");
  // (grad_x (B, n), grad_params (B, 2n)) from grad_out (B, k + n); kept's gradient is grad_out's
  // kept columns, which the caller takes as a view.
  m.def("affine_coupling_merge_bwd(Tensor grad_out, Tensor? grad_logdet, Tensor saved, Tensor scale_or_factor, "
        "bool is_factor, int mode, float clamp, bool inverse, bool kept_first) -> (Tensor, Tensor)");
  // The merge op's backward from its OUTPUT alone (memory-saving backprop keeps no input):
  // (input (B, n), grad_x (B, n), grad_params (B, 2n)), the op's input rebuilt in the same pass.
  m.def("affine_coupling_merge_bwd_out(Tensor grad_out, Tensor? grad_logdet, Tensor out, Tensor params, int mode, "
        "float clamp, bool inverse, bool kept_first) -> (Tensor, Tensor, Tensor)");
  // (out, logdet): x (B, ...) with params x.shape + (3 bins - 1,) = [widths | heights | derivatives];
  // logdet (B,) = logdet_in + the row's sum of log|dout/dx| (float32, float64 for float64 x).
  // The knot style (flowkern.reference.rq_spline): min sizes and derivative, exp or softplus
  // derivatives, zuko's soft clamp with log(slope) (0: none).
  // The interval [lo, hi] ([-bound, bound] for nflows' linear tails); learned_ends: nflows'
  // tails=None, 3 bins + 1 params per element (the end derivatives too).
  m.def("rq_spline_fwd(Tensor x, Tensor params, int bins, float lo, float hi, bool inverse, Tensor? logdet, "
        "float min_width, float min_height, float min_derivative, bool exp_derivative, float log_slope, "
        "bool learned_ends) -> (Tensor, Tensor)");
  // (grad x_in, grad params); x_in is the op's input (x going forward, y going back).
  m.def("rq_spline_bwd(Tensor grad_out, Tensor? grad_logdet, Tensor x_in, Tensor params, int bins, float lo, "
        "float hi, bool inverse, float min_width, float min_height, float min_derivative, bool exp_derivative, "
        "float log_slope, bool learned_ends) -> (Tensor, Tensor)");

  // The per-channel ops take x (B, C, *spatial) viewed as (B, C, S), S = prod(spatial), and (C,)
  // parameters of x's dtype; their log-det is the same for every row. Their CPU and CUDA
  // implementations register themselves (TORCH_LIBRARY_IMPL) in their own source files.
  //
  // actnorm: out = (x + shift) * exp(log_scale), or its inverse x = out * exp(-log_scale) - shift.
  m.def("actnorm_fwd(Tensor x, Tensor shift, Tensor log_scale, bool inverse, Tensor? logdet) -> (Tensor, Tensor)");
  // (grad_x, grad_shift, grad_log_scale) from the op's OUTPUT `out` (y going forward, x going
  // back), which the next layer keeps anyway; parameter grads reduced deterministically.
  m.def("actnorm_bwd(Tensor grad_out, Tensor? grad_logdet, Tensor out, Tensor shift, Tensor log_scale, "
        "bool inverse) -> (Tensor, Tensor, Tensor)");
  // Per-channel (mean, biased var) over batch and space, deterministic.
  m.def("batch_stats(Tensor x) -> (Tensor, Tensor)");
  // batch-norm flow with given statistics: out = (x - mean) * exp(a) + beta,
  // a = log_gamma - 0.5 log(var + eps); inverse x = (out - beta) * exp(-a) + mean.
  m.def("batchnorm_flow_fwd(Tensor x, Tensor mean, Tensor var, Tensor log_gamma, Tensor beta, float eps, "
        "bool inverse, Tensor? logdet) -> (Tensor, Tensor)");
  // (grad_x, grad_mean, grad_var, grad_log_gamma, grad_beta) from the op's output. With
  // batch_stats (forward only), mean/var were batch_stats(x): grad_x includes the paths through
  // them and grad_mean, grad_var are empty.
  m.def("batchnorm_flow_bwd(Tensor grad_out, Tensor? grad_logdet, Tensor out, Tensor mean, Tensor var, "
        "Tensor log_gamma, Tensor beta, float eps, bool inverse, bool batch_stats) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // dequantize_logit: uint8 pixels x (B, ...) -> y = logit(alpha + (1 - 2 alpha)(x + u) / 256)
  // of `dtype`, u the given noise (of `dtype`) or, when noise is None, the counter-based uniform
  // noise of `seed` (math/dequantize_logit.h); logdet adds -D log 256 + the logit's log-det.
  m.def("dequantize_logit_fwd(Tensor x, Tensor? noise, int seed, float alpha, ScalarType dtype, Tensor? logdet) "
        "-> (Tensor, Tensor)");
  // grad of the given noise (recomputed from x and noise).
  m.def("dequantize_logit_bwd(Tensor grad_out, Tensor? grad_logdet, Tensor x, Tensor noise, float alpha) -> Tensor");
  // Sampling direction: logits y -> pixel values clamp(floor(256 v), 0, 255) in y's dtype, and
  // the inverse's log-det.
  m.def("dequantize_logit_inv(Tensor y, float alpha, Tensor? logdet) -> (Tensor, Tensor)");

  // gaussian_nll: per row 0.5 sum z^2 + D/2 log(2 pi) - logdet, divided by D ln 2 when bits.
  m.def("gaussian_nll_fwd(Tensor z, Tensor? logdet, bool bits) -> Tensor");
  // grad_z = grad_row * z (/ D ln 2 when bits); the log-det's gradient is -grad (/ D ln 2).
  m.def("gaussian_nll_bwd(Tensor grad, Tensor z, bool bits) -> Tensor");
}

#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("affine_coupling_fwd", &flowkern::cuda::affine_coupling_fwd);
  m.impl("affine_coupling_bwd", &flowkern::cuda::affine_coupling_bwd);
  m.impl("affine_coupling_merge_fwd", &flowkern::cuda::affine_coupling_merge_fwd);
  m.impl("affine_coupling_merge_bwd", &flowkern::cuda::affine_coupling_merge_bwd);
  m.impl("affine_coupling_merge_bwd_out", &flowkern::cuda::affine_coupling_merge_bwd_out);
  m.impl("rq_spline_fwd", &flowkern::cuda::rq_spline_fwd);
  m.impl("rq_spline_bwd", &flowkern::cuda::rq_spline_bwd);
}
#endif

// A bare Python module, so `import flowkern._C` loads the library and runs the registrations
// above without pulling pybind11 into the build.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "flowkern compiled ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef FLOWKERN_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
