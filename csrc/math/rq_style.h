// The knot style of the rational-quadratic spline: how its raw params become knots
// (flowkern.reference.rq_spline, "Styles of knots"). Its own header so that csrc/ops.h can
// check one without the spline's templates.
#pragma once

#include "common.h"

namespace flowkern {
namespace math {

// nflows' and normflows' style is {1e-3, 1e-3, 1e-3, false, 0, false}; zuko's
// {0, 0, 0, true, log(slope), false}; nflows' tails=None {1e-3, 1e-3, 1e-3, false, 0, true}.
struct RqStyle {
  double min_width, min_height, min_derivative;
  bool exp_derivative;  // d = min_d + exp(ud), else min_d + softplus(ud)
  double log_slope;     // < 0: zuko's soft clamp of the raw params first; 0: none
  bool learned_ends;    // the end derivatives from params too (K + 1 derivatives), else 1
};

// Params per element: K widths, K heights and K - 1 derivatives (K + 1 with learned ends).
FLOWKERN_HD int rq_params_per_element(int bins, bool learned_ends) { return learned_ends ? 3 * bins + 1 : 3 * bins - 1; }

}  // namespace math
}  // namespace flowkern
