// The knot style of the rational-quadratic spline: how its raw params become knots
// (flowkern.reference.rq_spline, "Styles of knots"). Its own header so that csrc/ops.h can
// check one without the spline's templates.
#pragma once

namespace flowkern {
namespace math {

// nflows' and normflows' style is {1e-3, 1e-3, 1e-3, false, 0}; zuko's {0, 0, 0, true, log(slope)}.
struct RqStyle {
  double min_width, min_height, min_derivative;
  bool exp_derivative;  // d = min_d + exp(ud), else min_d + softplus(ud)
  double log_slope;     // < 0: zuko's soft clamp of the raw params first; 0: none
};

}  // namespace math
}  // namespace flowkern
