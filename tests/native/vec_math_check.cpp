// Every float through flowkern's inline fk_exp / fk_log (csrc/cpu/vec_math.h) and through
// at::vec's Vectorized<float>::exp() / log() (Sleef) on the capability it is compiled for;
// prints "<op> <differing> <checked>", NaNs of either sign counted equal. Built and run by
// tests/test_vec_math.py with setup.py's flags.
#include "cpu/vec_math.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

using at::vec::Vectorized;

template <typename Ours, typename Theirs>
static void check(const char* name, Ours ours, Theirs theirs) {
  constexpr int W = Vectorized<float>::size();
  alignas(64) float in[W], a[W], b[W];
  uint64_t differ = 0, checked = 0;
  for (uint64_t base = 0; base < (uint64_t(1) << 32); base += W) {
    for (int l = 0; l < W; ++l) {
      const uint32_t bits = static_cast<uint32_t>(base + l);
      std::memcpy(&in[l], &bits, 4);
    }
    const Vectorized<float> x = Vectorized<float>::loadu(in);
    ours(x).store(a);
    theirs(x).store(b);
    for (int l = 0; l < W; ++l) {
      const bool same = std::memcmp(&a[l], &b[l], 4) == 0 || (std::isnan(a[l]) && std::isnan(b[l]));
      if (!same && differ < 3) std::fprintf(stderr, "%s(%a): %a vs %a\n", name, in[l], a[l], b[l]);
      differ += !same;
    }
    checked += W;
  }
  std::printf("%s %llu %llu\n", name, static_cast<unsigned long long>(differ), static_cast<unsigned long long>(checked));
}

int main() {
  check("exp", [](const Vectorized<float>& x) { return flowkern::math::fk_exp(x); },
        [](const Vectorized<float>& x) { return x.exp(); });
  check("log", [](const Vectorized<float>& x) { return flowkern::math::fk_log(x); },
        [](const Vectorized<float>& x) { return x.log(); });
  return 0;
}
