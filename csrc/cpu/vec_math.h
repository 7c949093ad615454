// at::vec::Vectorized overloads of the math helpers in math/common.h, so the op headers'
// templates compile to SIMD code (Sleef exp/log/tanh) on the CPU. Include before op headers:
// the templates look these names up at definition time.
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace flowkern {
namespace math {

template <typename T>
inline at::vec::Vectorized<T> fk_exp(const at::vec::Vectorized<T>& x) { return x.exp(); }
template <typename T>
inline at::vec::Vectorized<T> fk_log(const at::vec::Vectorized<T>& x) { return x.log(); }
template <typename T>
inline at::vec::Vectorized<T> fk_tanh(const at::vec::Vectorized<T>& x) { return x.tanh(); }

}  // namespace math
}  // namespace flowkern

#include "../math/common.h"
