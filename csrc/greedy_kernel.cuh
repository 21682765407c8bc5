// The CUDA greedy kernel and its device helpers, kept apart from the launcher (greedy_cuda.cu) so
// that the same source also compiles for the host under tests/simt/simt.h (the SIMT emulation).
#pragma once

#include <math_constants.h>

#include <climits>
#include <cstdint>

// Dynamic shared memory: nvcc gets the usual extern array; the emulation defines this macro first.
#ifndef OTPRUNE_DYNAMIC_SHARED
#define OTPRUNE_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace otprune {
namespace detail {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return -CUDART_INF_F; }
template <>
__device__ __forceinline__ double neg_inf<double>() { return -CUDART_INF; }

// Whether (v, i) beats (bv, bi): larger value, NaN counts as largest, ties to the lower index.
template <typename T>
__device__ __forceinline__ bool better(T v, int i, T bv, int bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn || bn) return vn && (!bn || i < bi);
  return v > bv || (v == bv && i < bi);
}

// Warp-wide argmax of the lanes' (bv, bi) pairs; lane 0 ends with the winner.
template <typename T>
__device__ __forceinline__ void warp_argmax(T& bv, int& bi) {
  for (int off = 16; off > 0; off >>= 1) {
    const T ov = __shfl_down_sync(0xffffffffu, bv, off);
    const int oi = __shfl_down_sync(0xffffffffu, bi, off);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
}

// Block-wide argmax of d2[0:n] (torch.max semantics). Every thread gets the index and value.
template <typename T>
__device__ void block_argmax(const T* d2, int n, T* red_v, int* red_i, int& j, T& pivot) {
  T bv = neg_inf<T>();
  int bi = INT_MAX;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    if (better(d2[i], i, bv, bi)) {
      bv = d2[i];
      bi = i;
    }
  }
  warp_argmax(bv, bi);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    red_v[warp] = bv;
    red_i[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = lane < kWarps ? red_v[lane] : neg_inf<T>();
    bi = lane < kWarps ? red_i[lane] : INT_MAX;
    warp_argmax(bv, bi);
    if (lane == 0) {
      red_v[kWarps] = bv;
      red_i[kWarps] = bi;
    }
  }
  __syncthreads();
  j = red_i[kWarps];
  pivot = red_v[kWarps];
  __syncthreads();  // red_* are reused by the next call
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    greedy_kernel(const T* __restrict__ s, const int64_t* __restrict__ ks, const uint8_t* __restrict__ valid,
                  int n, int k_max, int rows, T gamma, T* __restrict__ work, int64_t* __restrict__ picks) {
  OTPRUNE_DYNAMIC_SHARED(unsigned char, smem);
  T* d2 = reinterpret_cast<T*>(smem);
  __shared__ T red_v[kWarps + 1];
  __shared__ int red_i[kWarps + 1];

  const int b = blockIdx.x;
  const size_t nn = static_cast<size_t>(n) * n;
  const T* S = s + b * nn;
  T* C = work + static_cast<size_t>(b) * rows * n;
  int64_t* out = picks + static_cast<size_t>(b) * k_max;
  const uint8_t* ok = valid ? valid + static_cast<size_t>(b) * n : nullptr;
  const int k = ks ? static_cast<int>(ks[b]) : k_max;

  // d2 = diag(L) = 1 + gamma * ||S_i||^2, summed down column i (= row i; coalesced).
  for (int i = threadIdx.x; i < n; i += kThreads) {
    T acc = 0;
    for (int m = 0; m < n; ++m) {
      const T v = S[static_cast<size_t>(m) * n + i];
      acc += v * v;
    }
    const T norm = sqrt(acc);
    d2[i] = (ok && !ok[i]) ? neg_inf<T>() : norm * norm * gamma + T(1);
  }
  __syncthreads();
  int j;
  T pivot;
  block_argmax(d2, n, red_v, red_i, j, pivot);
  if (threadIdx.x == 0) out[0] = j;

  for (int t = 0; t + 1 < k; ++t) {
    // e = (gamma * S[j, :] S - C[:t, j]^T C[:t, :]) * scale;  C[t, :] = e;  d2 -= e * e.
    const T scale = T(1) / sqrt(pivot);
    const T* sj = S + static_cast<size_t>(j) * n;
    T* e = C + static_cast<size_t>(t) * n;
    for (int i = threadIdx.x; i < n; i += kThreads) {
      T acc = 0;
      int m = 0;
      for (; m + 4 <= n; m += 4) {
        const T* col = S + static_cast<size_t>(m) * n + i;
        acc += sj[m] * col[0] + sj[m + 1] * col[n] + sj[m + 2] * col[2 * n] + sj[m + 3] * col[3 * n];
      }
      for (; m < n; ++m) acc += sj[m] * S[static_cast<size_t>(m) * n + i];
      acc *= gamma;
      for (int r = 0; r < t; ++r) {
        const T* row = C + static_cast<size_t>(r) * n;
        acc -= row[j] * row[i];
      }
      acc *= scale;
      e[i] = acc;
      d2[i] -= acc * acc;
    }
    __syncthreads();
    if (threadIdx.x == 0) d2[j] = neg_inf<T>();
    __syncthreads();
    block_argmax(d2, n, red_v, red_i, j, pivot);
    if (threadIdx.x == 0) out[t + 1] = j;
  }
  for (int t = k + threadIdx.x; t < k_max; t += kThreads) out[t] = -1;
}

}  // namespace detail
}  // namespace otprune
