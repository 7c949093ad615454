// The Python module of one CPU capability's kernels, flowkern._cpu_<capability> (setup.py
// compiles every csrc/cpu source once per capability, with that ISA's flags, and names the
// module by FLOWKERN_CPU_MODULE). flowkern/_ext.py imports flowkern._C (the schemas) first, then
// the one capability module the running CPU supports: its registrations are the CPU kernels.
#include <Python.h>
#include <torch/library.h>

#include "../ops.h"

#ifndef FLOWKERN_CPU_MODULE
#error "setup.py defines FLOWKERN_CPU_MODULE (the module's name, _cpu_<capability>)"
#endif

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("affine_coupling_fwd", &flowkern::cpu::affine_coupling_fwd);
  m.impl("affine_coupling_bwd", &flowkern::cpu::affine_coupling_bwd);
  m.impl("affine_coupling_merge_fwd", &flowkern::cpu::affine_coupling_merge_fwd);
  m.impl("affine_coupling_merge_bwd", &flowkern::cpu::affine_coupling_merge_bwd);
  m.impl("affine_coupling_merge_bwd_out", &flowkern::cpu::affine_coupling_merge_bwd_out);
  m.impl("rq_spline_fwd", &flowkern::cpu::rq_spline_fwd);
  m.impl("rq_spline_bwd", &flowkern::cpu::rq_spline_bwd);
}

#define FK_CONCAT_(a, b) a##b
#define FK_CONCAT(a, b) FK_CONCAT_(a, b)
#define FK_STRING_(x) #x
#define FK_STRING(x) FK_STRING_(x)

// A bare module (no pybind11), as flowkern._C: `capability` says which ISA it was compiled for.
extern "C" PyObject* FK_CONCAT(PyInit_, FLOWKERN_CPU_MODULE)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, FK_STRING(FLOWKERN_CPU_MODULE),
                                          "flowkern CPU kernels of one vector ISA", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) PyModule_AddStringConstant(module, "capability", FK_STRING(CPU_CAPABILITY));
  return module;
}
