// CPU launchers for the per-channel ops (ActNorm, the batch-norm flow, batch statistics) over the
// math in math/channel_affine.h: the (C,) coefficients once per call, in float64, then
// at::vec::Vectorized passes over x in parallel (at::parallel_for).
//
// Two layouts of x viewed as (B, C, S):
// - planes (S at least one vector): each (row, channel) plane is S contiguous values sharing one
//   coefficient, broadcast into a register;
// - rows (small S, e.g. (B, C) features): the coefficients are expanded to one per column of a
//   row, and rows are folded together (k rows = one longer "row") until a row fills vectors.
//
// Per-channel sums over batch and space (the backward's R1, R2; the statistics' shifted sums)
// are DETERMINISTIC: the work is cut into chunks fixed by the shape alone (never by the thread
// count), each chunk writes its own float64 partial sums, and the partials are added in chunk
// order. Inside a chunk, vector lanes accumulate in the input's precision over at most
// kFlushRows rows or kFlushVecs vectors before they are widened into float64, so float32 sums
// stay accurate (about as accurate as PyTorch's cascade sum) at nearly the cost of float ones.
#include "vec_math.h"
#include "../math/channel_affine.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <vector>

namespace flowkern {
namespace cpu {
namespace {

using at::vec::Vectorized;
using namespace flowkern::math;

constexpr int64_t kGrainElems = 32768;   // elements per at::parallel_for chunk: small inputs stay on one thread
constexpr int64_t kChunkElems = 32768;   // elements per reduction chunk
constexpr int64_t kMaxChunks = 32;       // row chunks per column (bounds the partial sums' buffer)
constexpr int64_t kColBlock = 2048;      // columns per reduction task in the row layout (its sums stay in L1)
constexpr int64_t kFlushRows = 8;        // rows a lane sums in the input's precision (row layout)
constexpr int64_t kFlushVecs = 16;       // vectors a lane sums in the input's precision (plane layout)
constexpr int64_t kMinRowVecs = 4;       // rows are folded until a row spans this many vectors

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
struct Layout {
  static constexpr int64_t W = Vectorized<scalar_t>::size();
  int64_t B, C, S, numel;
  bool planes;
  int64_t fold;   // row layout: batch rows per (folded) row
  int64_t width;  // row layout: elements per (folded) row, fold * C * S
  int64_t rows;   // row layout: folded rows; the last may be shorter

  explicit Layout(const at::Tensor& x) : B(x.size(0)), C(x.size(1)), numel(x.numel()) {
    S = 1;
    for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
    planes = S >= W;
    const int64_t n = C * S;
    fold = n == 0 ? 1 : std::max<int64_t>(1, ceil_div(kMinRowVecs * W, n));
    width = n * fold;
    rows = width == 0 ? 0 : ceil_div(numel, width);
  }
};

// Per-channel values (double) as the kernels read them: scalar_t, one per channel (planes) or
// expanded to one per column of a (folded) row.
template <typename scalar_t>
std::vector<scalar_t> coef_array(const Layout<scalar_t>& L, const std::vector<double>& per_channel) {
  std::vector<scalar_t> base(per_channel.begin(), per_channel.end());
  if (L.planes) return base;
  std::vector<scalar_t> out(L.width);
  const int64_t n = L.C * L.S;
  if (L.S == 1) std::copy(base.begin(), base.end(), out.begin());
  else
    for (int64_t c = 0; c < L.C; ++c) std::fill_n(out.begin() + c * L.S, L.S, base[c]);
  for (int64_t f = 1; f < L.fold; ++f) std::copy_n(out.begin(), n, out.begin() + f * n);
  return out;
}

// Adds per-column sums of one (folded) row layout's chunk into per-channel sums, in column order.
template <typename scalar_t>
void add_columns(const Layout<scalar_t>& L, const double* part, std::vector<double>& sum) {
  const int64_t n = L.C * L.S;
  for (int64_t f = 0; f < L.fold; ++f) {
    const double* p = part + f * n;
    if (L.S == 1) {
      for (int64_t c = 0; c < L.C; ++c) sum[c] += p[c];
    } else {
      for (int64_t c = 0; c < L.C; ++c)
        for (int64_t s = 0; s < L.S; ++s) sum[c] += p[c * L.S + s];
    }
  }
}

template <typename scalar_t, size_t K>
std::array<Vectorized<scalar_t>, K> load_coefs(const std::array<const scalar_t*, K>& coef, int64_t j, int64_t lanes) {
  std::array<Vectorized<scalar_t>, K> k;
  for (size_t i = 0; i < K; ++i) k[i] = Vectorized<scalar_t>::loadu(coef[i] + j, lanes);
  return k;
}

template <typename scalar_t, size_t K>
std::array<Vectorized<scalar_t>, K> broadcast_coefs(const std::array<const scalar_t*, K>& coef, int64_t c) {
  std::array<Vectorized<scalar_t>, K> k;
  for (size_t i = 0; i < K; ++i) k[i] = Vectorized<scalar_t>(coef[i][c]);
  return k;
}

// The pointers a parallel task reads and writes. Each task copies them into locals first: the
// vector stores are may_alias, so pointers read through the closure would be reloaded after
// every store, which costs these loops a third of their speed.
template <typename scalar_t, size_t K>
struct TaskPointers {
  const scalar_t* a;
  const scalar_t* b;
  scalar_t* out;
  std::array<const scalar_t*, K> coef;
};

// out[i] = f(a[i], b[i], coefficients of i's channel) over every element (b unused unless TWO).
template <typename scalar_t, bool TWO, size_t K, typename F>
void channel_map(const Layout<scalar_t>& L, const scalar_t* a, const scalar_t* b, scalar_t* out,
                 const std::array<const scalar_t*, K>& coef, const F& f) {
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t W = Vec::size();
  const TaskPointers<scalar_t, K> ptrs{a, b, out, coef};
  if (L.planes) {
    const int64_t C = L.C, S = L.S;
    at::parallel_for(0, L.B * C, row_grain(S, kGrainElems), [ptrs_ = ptrs, C, S, f](int64_t p0, int64_t p1) {
      const TaskPointers<scalar_t, K> ptrs = ptrs_;
      for (int64_t p = p0; p < p1; ++p) {
        const auto k = broadcast_coefs(ptrs.coef, p % C);
        for (int64_t s = 0; s < S; s += W) {
          const int64_t i = p * S + s, lanes = std::min(W, S - s);
          const Vec va = Vec::loadu(ptrs.a + i, lanes);
          const Vec vb = TWO ? Vec::loadu(ptrs.b + i, lanes) : va;
          f(va, vb, k).store(ptrs.out + i, lanes);
        }
      }
    });
  } else {
    const int64_t width = L.width, numel = L.numel;
    at::parallel_for(0, L.rows, row_grain(width, kGrainElems), [ptrs_ = ptrs, width, numel, f](int64_t r0, int64_t r1) {
      const TaskPointers<scalar_t, K> ptrs = ptrs_;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = r * width, len = std::min(width, numel - base);
        for (int64_t j = 0; j < len; j += W) {
          const int64_t i = base + j, lanes = std::min(W, len - j);
          const Vec va = Vec::loadu(ptrs.a + i, lanes);
          const Vec vb = TWO ? Vec::loadu(ptrs.b + i, lanes) : va;
          f(va, vb, load_coefs(ptrs.coef, j, lanes)).store(ptrs.out + i, lanes);
        }
      }
    });
  }
}

// Per channel c, sum1[c] and sum2[c] (double) = the sums over c's elements of the two terms
// f(a[i], b[i], coefficients, t1, t2) gives; when WRITE, out[i] = f's return value on the way.
// Both layouts walk memory in order (rows, then columns), so the hardware prefetchers keep up.
template <typename scalar_t, bool TWO, bool WRITE, size_t K, typename F>
void channel_reduce(const Layout<scalar_t>& L, const scalar_t* a, const scalar_t* b, scalar_t* out,
                    const std::array<const scalar_t*, K>& coef, const F& f, std::vector<double>& sum1,
                    std::vector<double>& sum2) {
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t W = Vec::size();
  sum1.assign(L.C, 0.0);
  sum2.assign(L.C, 0.0);
  const TaskPointers<scalar_t, K> ptrs{a, b, out, coef};
  // One vector of elements at i with `lanes` valid lanes; the invalid lanes' terms are zeroed.
  auto element = [f](const TaskPointers<scalar_t, K>& p, int64_t i, int64_t lanes, const std::array<Vec, K>& k,
                     Vec& t1, Vec& t2) {
    const Vec va = Vec::loadu(p.a + i, lanes);
    const Vec vb = TWO ? Vec::loadu(p.b + i, lanes) : va;
    const Vec w = f(va, vb, k, t1, t2);
    if (WRITE) w.store(p.out + i, lanes);
    if (lanes < W) {
      t1 = Vec::set(Vec(scalar_t(0)), t1, lanes);
      t2 = Vec::set(Vec(scalar_t(0)), t2, lanes);
    }
  };
  if (L.planes) {
    // Task = chunk of rows: per channel, one double per term, summed over the chunk's planes.
    const int64_t row_elems = std::max<int64_t>(L.C * L.S, 1);
    const int64_t chunk_rows = std::max<int64_t>(1, kChunkElems / row_elems);
    const int64_t chunks = ceil_div(L.B, chunk_rows);
    std::vector<double> part(2 * chunks * L.C, 0.0);
    at::parallel_for(0, chunks, std::max<int64_t>(1, kGrainElems / (chunk_rows * row_elems)),
                     [&, ptrs_ = ptrs, element](int64_t t0, int64_t t1) {
      const TaskPointers<scalar_t, K> ptrs = ptrs_;
      const int64_t B = L.B, C = L.C, S = L.S;
      for (int64_t chunk = t0; chunk < t1; ++chunk) {
        double* p = part.data() + 2 * chunk * C;
        for (int64_t row = chunk * chunk_rows; row < std::min(B, (chunk + 1) * chunk_rows); ++row) {
          for (int64_t c = 0; c < C; ++c) {
            const auto k = broadcast_coefs(ptrs.coef, c);
            const int64_t base = (row * C + c) * S;
            for (int64_t s0 = 0; s0 < S; s0 += kFlushVecs * W) {
              Vec acc1(scalar_t(0)), acc2(scalar_t(0));
              for (int64_t s = s0; s < std::min(S, s0 + kFlushVecs * W); s += W) {
                Vec t1, t2;
                element(ptrs, base + s, std::min(W, S - s), k, t1, t2);
                acc1 = acc1 + t1;
                acc2 = acc2 + t2;
              }
              p[2 * c] += static_cast<double>(hsum(acc1));
              p[2 * c + 1] += static_cast<double>(hsum(acc2));
            }
          }
        }
      }
    });
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {  // chunk order: fixed
      const double* p = part.data() + 2 * chunk * L.C;
      for (int64_t c = 0; c < L.C; ++c) {
        sum1[c] += p[2 * c];
        sum2[c] += p[2 * c + 1];
      }
    }
    return;
  }
  // Row layout. Task = (chunk of rows, block of columns): per-column sums over its rows, kept in
  // the input's precision over kFlushRows rows (an L1-resident buffer), then added into doubles.
  const int64_t chunk_rows = std::max(std::max<int64_t>(1, kChunkElems / std::max<int64_t>(L.width, 1)),
                                      ceil_div(L.rows, kMaxChunks));
  const int64_t chunks = ceil_div(L.rows, chunk_rows);
  const int64_t blocks = ceil_div(L.width, kColBlock);
  // Every element is written by its task's first flush (no zeroing pass).
  std::unique_ptr<double[]> part(new double[std::max<int64_t>(1, 2 * chunks * L.width)]);
  at::parallel_for(0, chunks * blocks,
                   std::max<int64_t>(1, kGrainElems / (chunk_rows * std::min(L.width, kColBlock) + 1)),
                   [&, ptrs_ = ptrs, element](int64_t t0, int64_t t1) {
    const TaskPointers<scalar_t, K> ptrs = ptrs_;
    const int64_t width = L.width, rows = L.rows, numel = L.numel;
    alignas(64) scalar_t acc[2][kColBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / blocks, j0 = (t % blocks) * kColBlock, j1 = std::min(width, j0 + kColBlock);
      double* p1 = part.get() + 2 * chunk * width;
      double* p2 = p1 + width;
      const int64_t r_end = std::min(rows, (chunk + 1) * chunk_rows);
      for (int64_t g0 = chunk * chunk_rows; g0 < r_end; g0 += kFlushRows) {
        std::fill_n(acc[0], j1 - j0, scalar_t(0));
        std::fill_n(acc[1], j1 - j0, scalar_t(0));
        for (int64_t r = g0; r < std::min(r_end, g0 + kFlushRows); ++r) {
          // The last folded row may end early: only its existing elements count.
          const int64_t end = std::min(j1, numel - r * width);
          for (int64_t j = j0; j < end; j += W) {
            const int64_t lanes = std::min(W, end - j);
            Vec t1, t2;
            element(ptrs, r * width + j, lanes, load_coefs(ptrs.coef, j, lanes), t1, t2);
            (Vec::loadu(acc[0] + (j - j0), lanes) + t1).store(acc[0] + (j - j0), lanes);
            (Vec::loadu(acc[1] + (j - j0), lanes) + t2).store(acc[1] + (j - j0), lanes);
          }
        }
        if (g0 == chunk * chunk_rows) {
          for (int64_t j = j0; j < j1; ++j) {
            p1[j] = static_cast<double>(acc[0][j - j0]);
            p2[j] = static_cast<double>(acc[1][j - j0]);
          }
        } else {
          for (int64_t j = j0; j < j1; ++j) {
            p1[j] += static_cast<double>(acc[0][j - j0]);
            p2[j] += static_cast<double>(acc[1][j - j0]);
          }
        }
      }
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {  // chunk order, then column order: fixed
    add_columns(L, part.get() + 2 * chunk * L.width, sum1);
    add_columns(L, part.get() + 2 * chunk * L.width + L.width, sum2);
  }
}

template <typename scalar_t>
std::vector<double> to_double(const at::Tensor& t) {
  const scalar_t* p = t.data_ptr<scalar_t>();
  return std::vector<double>(p, p + t.numel());
}

template <typename scalar_t>
void store_channels(at::Tensor& t, const std::vector<double>& values) {
  scalar_t* p = t.data_ptr<scalar_t>();
  for (size_t c = 0; c < values.size(); ++c) p[c] = static_cast<scalar_t>(values[c]);
}

// Every row's log-det: the incoming one plus `total` (S * sum_c log m_c).
template <typename scalar_t>
void write_logdet(at::Tensor& ld, const std::optional<at::Tensor>& logdet, double total) {
  scalar_t* out = ld.data_ptr<scalar_t>();
  const scalar_t* in = logdet.has_value() ? logdet->data_ptr<scalar_t>() : nullptr;
  const scalar_t add = static_cast<scalar_t>(total);
  for (int64_t b = 0; b < ld.numel(); ++b) out[b] = (in ? in[b] : scalar_t(0)) + add;
}

// sum over rows of dL/dlogdet, in row order.
template <typename scalar_t>
double logdet_grad_sum(const std::optional<at::Tensor>& grad_logdet) {
  if (!grad_logdet.has_value()) return 0.0;
  const scalar_t* p = grad_logdet->data_ptr<scalar_t>();
  double total = 0.0;
  for (int64_t b = 0; b < grad_logdet->numel(); ++b) total += static_cast<double>(p[b]);
  return total;
}

template <typename F>
void dispatch_inverse(bool inverse, F&& f) {
  if (inverse) f(std::true_type{});
  else f(std::false_type{});
}

void check_cpu_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "flowkern: the CPU ", op,
              " kernels take float32 or float64, got ", x.scalar_type());
}

// f(c, lanes) over the channels, Vectorized<double> lanes at a time: the per-channel math
// (exp, log) runs as SIMD, which matters for wide feature vectors (C = 784).
template <typename F>
void for_channel_vectors(int64_t C, const F& f) {
  constexpr int64_t W = Vectorized<double>::size();
  for (int64_t c = 0; c < C; c += W) f(c, std::min(W, C - c));
}

using VecD = Vectorized<double>;

// The per-channel coefficients (pre, m, post) and S * sum log m of one op and direction, in double.
struct Coeffs {
  std::vector<double> pre, m, post;
  double logdet = 0.0;

  explicit Coeffs(int64_t C) : pre(C), m(C), post(C), logm_(C) {}
  void store(int64_t c, int64_t lanes, const VecD& vpre, const VecD& vm, const VecD& vpost, const VecD& vlogm) {
    vpre.store(pre.data() + c, lanes);
    vm.store(m.data() + c, lanes);
    vpost.store(post.data() + c, lanes);
    vlogm.store(logm_.data() + c, lanes);
  }
  void finish(int64_t S) {
    double sum = 0.0;  // in channel order
    for (double v : logm_) sum += v;
    logdet = sum * static_cast<double>(S);
  }

 private:
  std::vector<double> logm_;
};

template <typename scalar_t, bool INVERSE>
Coeffs actnorm_coeffs_of(const at::Tensor& shift, const at::Tensor& log_scale, int64_t S) {
  const auto t = to_double<scalar_t>(shift), s = to_double<scalar_t>(log_scale);
  Coeffs k(shift.numel());
  for_channel_vectors(shift.numel(), [&](int64_t c, int64_t lanes) {
    VecD pre, m, post, logm;
    actnorm_coeffs<INVERSE>(VecD::loadu(t.data() + c, lanes), VecD::loadu(s.data() + c, lanes), pre, m, post, logm);
    k.store(c, lanes, pre, m, post, logm);
  });
  k.finish(S);
  return k;
}

template <typename scalar_t, bool INVERSE>
Coeffs batchnorm_coeffs_of(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& log_gamma,
                           const at::Tensor& beta, double eps, int64_t S) {
  const auto mu = to_double<scalar_t>(mean), v = to_double<scalar_t>(var), lg = to_double<scalar_t>(log_gamma),
             be = to_double<scalar_t>(beta);
  Coeffs k(mean.numel());
  for_channel_vectors(mean.numel(), [&](int64_t c, int64_t lanes) {
    // Padding lanes load 0: log(0 + eps) stays finite, and they are never stored.
    VecD pre, m, post, logm;
    batchnorm_coeffs<INVERSE>(VecD::loadu(mu.data() + c, lanes), VecD::loadu(v.data() + c, lanes),
                              VecD::loadu(lg.data() + c, lanes), VecD::loadu(be.data() + c, lanes), VecD(eps), pre,
                              m, post, logm);
    k.store(c, lanes, pre, m, post, logm);
  });
  k.finish(S);
  return k;
}

// out = (in + pre) m + post.
template <typename scalar_t>
void apply_coeffs(const Layout<scalar_t>& L, const at::Tensor& x, at::Tensor& out, const Coeffs& k) {
  const auto pre = coef_array(L, k.pre), m = coef_array(L, k.m), post = coef_array(L, k.post);
  using Vec = Vectorized<scalar_t>;
  channel_map<scalar_t, false>(L, x.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(),
                               std::array<const scalar_t*, 3>{pre.data(), m.data(), post.data()},
                               [](const Vec& in, const Vec&, const std::array<Vec, 3>& c) {
                                 return channel_apply(in, c[0], c[1], c[2]);
                               });
}

// grad_in = g m, and the sums R1, R2 of every channel, in one pass over (g, out).
template <typename scalar_t>
void backward_pass(const Layout<scalar_t>& L, const at::Tensor& g, const at::Tensor& out, at::Tensor& grad_in,
                   const Coeffs& k, std::vector<double>& r1, std::vector<double>& r2) {
  const auto m = coef_array(L, k.m), post = coef_array(L, k.post);
  using Vec = Vectorized<scalar_t>;
  channel_reduce<scalar_t, true, true>(
      L, g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), grad_in.data_ptr<scalar_t>(),
      std::array<const scalar_t*, 2>{m.data(), post.data()},
      [](const Vec& vg, const Vec& vo, const std::array<Vec, 2>& c, Vec& t1, Vec& t2) {
        t1 = vg;
        return channel_backward(vg, vo, c[0], c[1], t2);
      },
      r1, r2);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> actnorm_fwd(const at::Tensor& x, const at::Tensor& shift,
                                               const at::Tensor& log_scale, bool inverse,
                                               const std::optional<at::Tensor>& logdet) {
  check_channel_inputs("actnorm", x, {shift, log_scale}, logdet);
  check_cpu_dtype("actnorm", x);
  auto out = at::empty_like(x);
  auto ld = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flowkern_actnorm_fwd_cpu", [&] {
    const Layout<scalar_t> L(x);
    dispatch_inverse(inverse, [&](auto inv_c) {
      const Coeffs k = actnorm_coeffs_of<scalar_t, decltype(inv_c)::value>(shift, log_scale, L.S);
      apply_coeffs(L, x, out, k);
      write_logdet<scalar_t>(ld, logdet, k.logdet);
    });
  });
  return {out, ld};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_bwd(const at::Tensor& grad_out,
                                                           const std::optional<at::Tensor>& grad_logdet,
                                                           const at::Tensor& out, const at::Tensor& shift,
                                                           const at::Tensor& log_scale, bool inverse) {
  check_channel_inputs("actnorm", out, {shift, log_scale}, grad_logdet);
  check_channel_grad("actnorm", grad_out, out);
  check_cpu_dtype("actnorm", out);
  auto grad_in = at::empty_like(out);
  auto grad_shift = at::empty_like(shift);
  auto grad_log_scale = at::empty_like(log_scale);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "flowkern_actnorm_bwd_cpu", [&] {
    const Layout<scalar_t> L(out);
    dispatch_inverse(inverse, [&](auto inv_c) {
      constexpr bool INV = decltype(inv_c)::value;
      const Coeffs k = actnorm_coeffs_of<scalar_t, INV>(shift, log_scale, L.S);
      std::vector<double> r1, r2;
      backward_pass(L, grad_out, out, grad_in, k, r1, r2);
      const double sg = static_cast<double>(L.S) * logdet_grad_sum<scalar_t>(grad_logdet);
      std::vector<double> dt(L.C), ds(L.C);
      for_channel_vectors(L.C, [&](int64_t c, int64_t lanes) {
        VecD vt, vs;
        actnorm_param_grads<INV>(VecD::loadu(r1.data() + c, lanes), VecD::loadu(r2.data() + c, lanes), VecD(sg),
                                 VecD::loadu(k.m.data() + c, lanes), vt, vs);
        vt.store(dt.data() + c, lanes);
        vs.store(ds.data() + c, lanes);
      });
      store_channels<scalar_t>(grad_shift, dt);
      store_channels<scalar_t>(grad_log_scale, ds);
    });
  });
  return {grad_in, grad_shift, grad_log_scale};
}

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x) {
  check_channel_inputs("batch_stats", x, {}, std::nullopt);
  check_cpu_dtype("batch_stats", x);
  TORCH_CHECK(x.size(1) == 0 || x.numel() > 0, "flowkern: batch_stats needs at least one value per channel, got x of "
              "shape ", x.sizes());
  auto mean = at::empty({x.size(1)}, x.options());
  auto var = at::empty({x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flowkern_batch_stats_cpu", [&] {
    using Vec = Vectorized<scalar_t>;
    const Layout<scalar_t> L(x);
    const scalar_t* px = x.data_ptr<scalar_t>();
    const double n = static_cast<double>(L.B * L.S);
    // Two passes, as PyTorch's batch norm: the mean, then the sums around it (the pivot),
    // which leaves the variance nothing to cancel.
    auto shifted_sums = [&](const std::vector<double>& pivot, std::vector<double>& s1, std::vector<double>& s2) {
      const auto k = coef_array(L, pivot);
      channel_reduce<scalar_t, false, false>(
          L, px, nullptr, nullptr, std::array<const scalar_t*, 1>{k.data()},
          [](const Vec& v, const Vec&, const std::array<Vec, 1>& c, Vec& t1, Vec& t2) {
            const Vec d = v - c[0];
            t1 = d;
            t2 = d * d;
            return d;
          },
          s1, s2);
    };
    std::vector<double> pivot(L.C, 0.0), s1, s2;
    shifted_sums(pivot, s1, s2);
    for (int64_t c = 0; c < L.C; ++c) pivot[c] = static_cast<double>(static_cast<scalar_t>(s1[c] / n));
    shifted_sums(pivot, s1, s2);
    scalar_t* pm = mean.data_ptr<scalar_t>();
    scalar_t* pv = var.data_ptr<scalar_t>();
    for (int64_t c = 0; c < L.C; ++c) {
      double mu, v;
      batch_stats_finalize(pivot[c], s1[c], s2[c], n, mu, v);
      pm[c] = static_cast<scalar_t>(mu);
      pv[c] = static_cast<scalar_t>(v);
    }
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> batchnorm_flow_fwd(const at::Tensor& x, const at::Tensor& mean,
                                                      const at::Tensor& var, const at::Tensor& log_gamma,
                                                      const at::Tensor& beta, double eps, bool inverse,
                                                      const std::optional<at::Tensor>& logdet) {
  check_channel_inputs("batchnorm_flow", x, {mean, var, log_gamma, beta}, logdet);
  check_cpu_dtype("batchnorm_flow", x);
  auto out = at::empty_like(x);
  auto ld = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flowkern_batchnorm_flow_fwd_cpu", [&] {
    const Layout<scalar_t> L(x);
    dispatch_inverse(inverse, [&](auto inv_c) {
      const Coeffs k = batchnorm_coeffs_of<scalar_t, decltype(inv_c)::value>(mean, var, log_gamma, beta, eps, L.S);
      apply_coeffs(L, x, out, k);
      write_logdet<scalar_t>(ld, logdet, k.logdet);
    });
  });
  return {out, ld};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batchnorm_flow_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet, const at::Tensor& out,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& log_gamma, const at::Tensor& beta, double eps,
    bool inverse, bool batch_stats) {
  check_channel_inputs("batchnorm_flow", out, {mean, var, log_gamma, beta}, grad_logdet);
  check_channel_grad("batchnorm_flow", grad_out, out);
  check_cpu_dtype("batchnorm_flow", out);
  TORCH_CHECK(!(batch_stats && inverse), "flowkern: batchnorm_flow's batch-statistics backward is forward-only");
  auto grad_in = at::empty_like(out);
  auto grad_mean = batch_stats ? at::empty({0}, mean.options()) : at::empty_like(mean);
  auto grad_var = batch_stats ? at::empty({0}, var.options()) : at::empty_like(var);
  auto grad_log_gamma = at::empty_like(log_gamma);
  auto grad_beta = at::empty_like(beta);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "flowkern_batchnorm_flow_bwd_cpu", [&] {
    using Vec = Vectorized<scalar_t>;
    const Layout<scalar_t> L(out);
    const double sg = static_cast<double>(L.S) * logdet_grad_sum<scalar_t>(grad_logdet);
    const auto v = to_double<scalar_t>(var), lg = to_double<scalar_t>(log_gamma);
    if (batch_stats) {
      const Coeffs k = batchnorm_coeffs_of<scalar_t, false>(mean, var, log_gamma, beta, eps, L.S);
      const auto post = coef_array(L, k.post);  // beta
      std::vector<double> r1, r2;
      channel_reduce<scalar_t, true, false>(
          L, grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), nullptr,
          std::array<const scalar_t*, 1>{post.data()},
          [](const Vec& vg, const Vec& vo, const std::array<Vec, 1>& c, Vec& t1, Vec& t2) {
            t1 = vg;
            t2 = vg * (vo - c[0]);
            return vg;
          },
          r1, r2);
      std::vector<double> c0(L.C), k1(L.C), dlg(L.C), db(L.C);
      const double n = static_cast<double>(L.B * L.S);
      for_channel_vectors(L.C, [&](int64_t c, int64_t lanes) {
        VecD vlg, vb, vc0, vk1;
        batchnorm_train_grads(VecD::loadu(r1.data() + c, lanes), VecD::loadu(r2.data() + c, lanes), VecD(sg), VecD(n),
                              VecD::loadu(v.data() + c, lanes), VecD::loadu(lg.data() + c, lanes), VecD(eps), vlg, vb,
                              vc0, vk1);
        vlg.store(dlg.data() + c, lanes);
        vb.store(db.data() + c, lanes);
        vc0.store(c0.data() + c, lanes);
        vk1.store(k1.data() + c, lanes);
      });
      store_channels<scalar_t>(grad_log_gamma, dlg);
      store_channels<scalar_t>(grad_beta, db);
      const auto a0 = coef_array(L, c0), a1 = coef_array(L, k.m), a2 = coef_array(L, k1);
      channel_map<scalar_t, true>(L, grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                  grad_in.data_ptr<scalar_t>(),
                                  std::array<const scalar_t*, 4>{a0.data(), a1.data(), a2.data(), post.data()},
                                  [](const Vec& vg, const Vec& vo, const std::array<Vec, 4>& c) {
                                    return batchnorm_train_grad_x(vg, vo, c[0], c[1], c[2], c[3]);
                                  });
      return;
    }
    dispatch_inverse(inverse, [&](auto inv_c) {
      constexpr bool INV = decltype(inv_c)::value;
      const Coeffs k = batchnorm_coeffs_of<scalar_t, INV>(mean, var, log_gamma, beta, eps, L.S);
      std::vector<double> r1, r2;
      backward_pass(L, grad_out, out, grad_in, k, r1, r2);
      std::vector<double> dm(L.C), dv(L.C), dlg(L.C), db(L.C);
      for_channel_vectors(L.C, [&](int64_t c, int64_t lanes) {
        VecD vm, vv, vlg, vb;
        batchnorm_param_grads<INV>(VecD::loadu(r1.data() + c, lanes), VecD::loadu(r2.data() + c, lanes), VecD(sg),
                                   VecD::loadu(k.m.data() + c, lanes), VecD::loadu(v.data() + c, lanes), VecD(eps),
                                   vm, vv, vlg, vb);
        vm.store(dm.data() + c, lanes);
        vv.store(dv.data() + c, lanes);
        vlg.store(dlg.data() + c, lanes);
        vb.store(db.data() + c, lanes);
      });
      store_channels<scalar_t>(grad_mean, dm);
      store_channels<scalar_t>(grad_var, dv);
      store_channels<scalar_t>(grad_log_gamma, dlg);
      store_channels<scalar_t>(grad_beta, db);
    });
  });
  return {grad_in, grad_mean, grad_var, grad_log_gamma, grad_beta};
}

}  // namespace cpu
}  // namespace flowkern

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("actnorm_fwd", &flowkern::cpu::actnorm_fwd);
  m.impl("actnorm_bwd", &flowkern::cpu::actnorm_bwd);
  m.impl("batch_stats", &flowkern::cpu::batch_stats);
  m.impl("batchnorm_flow_fwd", &flowkern::cpu::batchnorm_flow_fwd);
  m.impl("batchnorm_flow_bwd", &flowkern::cpu::batchnorm_flow_bwd);
}
