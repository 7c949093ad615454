// Schemas of the flowkern torch ops and their CPU / CUDA implementations. Importing
// flowkern._C runs these registrations; the fake (meta) implementations used by
// torch.compile live in Python (flowkern/ops), beside the autograd wiring.
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
  // (out, logdet): x (B, ...) with params x.shape + (3 bins - 1,) = [widths | heights | derivatives];
  // logdet (B,) = logdet_in + the row's sum of log|dout/dx| (float32, float64 for float64 x).
  m.def("rq_spline_fwd(Tensor x, Tensor params, int bins, float bound, bool inverse, Tensor? logdet) "
        "-> (Tensor, Tensor)");
  // (grad x_in, grad params); x_in is the op's input (x going forward, y going back).
  m.def("rq_spline_bwd(Tensor grad_out, Tensor? grad_logdet, Tensor x_in, Tensor params, int bins, float bound, "
        "bool inverse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("affine_coupling_fwd", &flowkern::cpu::affine_coupling_fwd);
  m.impl("affine_coupling_bwd", &flowkern::cpu::affine_coupling_bwd);
  m.impl("rq_spline_fwd", &flowkern::cpu::rq_spline_fwd);
  m.impl("rq_spline_bwd", &flowkern::cpu::rq_spline_bwd);
}

#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("affine_coupling_fwd", &flowkern::cuda::affine_coupling_fwd);
  m.impl("affine_coupling_bwd", &flowkern::cuda::affine_coupling_bwd);
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
