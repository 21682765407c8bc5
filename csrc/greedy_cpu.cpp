// CPU greedy log-det maximisation with incremental Cholesky, one thread per image (at::parallel_for
// over the batch). Arithmetic follows otprune/greedy.py step by step, in the similarity's dtype.
// Steps are not split over threads: a per-step barrier costs more than it saves at typical sizes,
// and far more on a loaded machine.
// The build targets baseline x86-64 (SSE2); on x86-64 the whole per-image loop is also compiled for
// AVX2 + FMA and picked at run time when the CPU has both (the step loops are compute-bound: about
// 3x faster at N = 576). FMA contracts a * b + c, so the last bits of a step may differ between the
// two builds; both stay within the float64 reference tests' tolerances.
#include "greedy_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__)
#define OTPRUNE_X86_DISPATCH 1
#define OTPRUNE_INLINE inline __attribute__((always_inline))
#else
#define OTPRUNE_INLINE inline
#endif

namespace otprune {
namespace {

// A residual after its update, d2 - e^2 floored at min(d2, 1) (a NaN update falls to the floor,
// as torch.fmax): every exact residual of L = I + gamma S S^T is >= 1, and in float32 a large gamma
// on nearly identical tokens rounds residuals below 1, then below 0, where the Cholesky rows
// explode to inf and NaN and picks would repeat. Live items stay >= 1, taken and padding items
// -inf, so every pick is a distinct real token whatever the rounding.
template <typename T>
OTPRUNE_INLINE T residual_update(T d2, T e) {
  const T left = d2 - e * e;
  const T floor = d2 < T(1) ? d2 : T(1);
  return left >= floor ? left : floor;
}

// Index of the largest value; ties go to the lowest index and NaN counts as largest (torch.max).
template <typename T>
OTPRUNE_INLINE int64_t argmax(const T* v, int64_t n) {
  int64_t best = 0;
  T bv = v[0];
  for (int64_t i = 1; i < n; ++i) {
    const T x = v[i];
    if (x > bv || (std::isnan(x) && !std::isnan(bv))) {
      bv = x;
      best = i;
    }
  }
  return best;
}

// e = S[j, :] S for symmetric (n, n) S, as a sum of rows scaled by S[j, m] (contiguous, vectorised
// axpys, four rows per pass over e).
template <typename T>
OTPRUNE_INLINE void row_product(const T* __restrict__ s, int64_t n, int64_t j, T* __restrict__ e) {
  const T* sj = s + j * n;
  std::fill(e, e + n, T(0));
  int64_t m = 0;
  for (; m + 4 <= n; m += 4) {
    const T a0 = sj[m], a1 = sj[m + 1], a2 = sj[m + 2], a3 = sj[m + 3];
    const T* r0 = s + m * n;
    const T* r1 = r0 + n;
    const T* r2 = r1 + n;
    const T* r3 = r2 + n;
    for (int64_t i = 0; i < n; ++i) e[i] += a0 * r0[i] + a1 * r1[i] + a2 * r2[i] + a3 * r3[i];
  }
  for (; m < n; ++m) {
    const T a = sj[m];
    const T* r = s + m * n;
    for (int64_t i = 0; i < n; ++i) e[i] += a * r[i];
  }
}

// The whole greedy for one image (see greedy_cpu.h for the buffers and the two forms of s).
template <typename T>
OTPRUNE_INLINE void greedy_one(const T* s, bool full, int64_t k, const uint8_t* valid, int64_t n, int64_t k_max, T gamma, T* c,
                T* d2, int64_t* picks) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) {  // d2 = diag(L) = 1 + gamma * ||S_i||^2
    const T* row = s + i * n;
    T g;
    if (full) {
      g = row[i];
    } else {
      T acc = 0;
      for (int64_t m = 0; m < n; ++m) acc += row[m] * row[m];
      const T norm = std::sqrt(acc);
      g = norm * norm * gamma;
    }
    d2[i] = (valid && !valid[i]) ? neg_inf : g + T(1);
  }
  int64_t j = argmax(d2, n);
  picks[0] = j;
  for (int64_t t = 0; t + 1 < k; ++t) {
    // e = (gamma * S[j, :] S - C[:t, j]^T C[:t, :]) * scale;  C[t, :] = e;  d2 -= e * e.
    const T scale = T(1) / std::sqrt(d2[j]);
    T* __restrict__ e = c + t * n;
    if (full) {
      std::copy(s + j * n, s + (j + 1) * n, e);
    } else {
      row_product(s, n, j, e);
      for (int64_t i = 0; i < n; ++i) e[i] *= gamma;
    }
    for (int64_t r = 0; r < t; ++r) {
      const T a = c[r * n + j];
      const T* __restrict__ row = c + r * n;
      for (int64_t i = 0; i < n; ++i) e[i] -= a * row[i];
    }
    for (int64_t i = 0; i < n; ++i) {
      e[i] *= scale;
      d2[i] = residual_update(d2[i], e[i]);
    }
    d2[j] = neg_inf;
    j = argmax(d2, n);
    picks[t + 1] = j;
  }
  std::fill(picks + k, picks + k_max, int64_t(-1));
}

// The two builds of greedy_one (see the file comment); same arguments.
template <typename T>
void greedy_one_base(const T* s, bool full, int64_t k, const uint8_t* valid, int64_t n, int64_t k_max, T gamma, T* c,
                     T* d2, int64_t* picks) {
  greedy_one(s, full, k, valid, n, k_max, gamma, c, d2, picks);
}

#ifdef OTPRUNE_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void greedy_one_avx2(const T* s, bool full, int64_t k, const uint8_t* valid,
                                                          int64_t n, int64_t k_max, T gamma, T* c, T* d2,
                                                          int64_t* picks) {
  greedy_one(s, full, k, valid, n, k_max, gamma, c, d2, picks);
}

bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

}  // namespace

template <typename T>
void greedy_cpu(const T* s, bool full, const int64_t* ks, const uint8_t* valid, int64_t batch, int64_t n,
                int64_t k_max, T gamma, T* work, T* d2, int64_t* picks) {
  const int64_t rows = std::max<int64_t>(k_max - 1, 1);
  auto one = &greedy_one_base<T>;
#ifdef OTPRUNE_X86_DISPATCH
  if (has_avx2_fma()) one = &greedy_one_avx2<T>;
#endif
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      one(s + b * n * n, full, ks[b], valid ? valid + b * n : nullptr, n, k_max, gamma, work + b * rows * n,
                 d2 + b * n, picks + b * k_max);
    }
  });
}

template void greedy_cpu<float>(const float*, bool, const int64_t*, const uint8_t*, int64_t, int64_t, int64_t,
                                float, float*, float*, int64_t*);
template void greedy_cpu<double>(const double*, bool, const int64_t*, const uint8_t*, int64_t, int64_t, int64_t,
                                 double, double*, double*, int64_t*);

}  // namespace otprune
