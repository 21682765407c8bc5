// The CUDA greedy kernel, its device helpers and its launch plan, kept apart from the launcher
// (greedy_cuda.cu) so that the same source also compiles for the host under tests/simt/simt.h
// (the SIMT emulation). Design and cost bound: greedy_cuda.cu's header.
#pragma once

#include <math_constants.h>

#include <climits>
#include <cstddef>
#include <cstdint>

// Dynamic shared memory: nvcc gets the usual extern array; the emulation defines this macro first.
#ifndef OTPRUNE_DYNAMIC_SHARED
#define OTPRUNE_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
#ifdef __CUDACC__
#include <cooperative_groups.h>  // thread-block clusters (sm_90); the emulation provides its own
#endif

namespace otprune {
namespace detail {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarp;
constexpr int kMaxCluster = 16;  // blocks per cluster (above 8 needs the non-portable opt-in)

// Launch plan for one batch. Every image is `cluster` blocks of `threads` threads; block r owns
// items [r * slice, (r + 1) * slice) of the image (cluster = 1: one block owns all N), thread x of
// it items x, x + threads, ... of that range; `threads` is chosen so that every thread owns the
// same number of items, up to the last warp (N = 576: 576 threads x 1; N = 2880: 960 x 3; N = 577:
// 608 x 1). All shared memory is dynamic (smem_bytes per block): the argmax scratch, the residuals
// d2 of the block's items and, when they fit under the limit, the Cholesky rows of those items
// (rows x slice values; else, for cluster = 1 only, the global workspace). A cluster keeps them on
// chip by construction, plus a copy of the pivot's column of the rows (rows values).
struct GreedyPlan {
  int threads;
  size_t smem_bytes;
  bool rows_on_chip;
  int cluster;
  int slice;
};

// Bytes of the argmax scratch: two slots (step parity) of one (value, index) pair per warp, plus
// two slots of the block's winner for the cluster-wide argmax.
inline constexpr size_t argmax_scratch_bytes(size_t elem) { return 2 * (kMaxWarps + 1) * (elem + sizeof(int)); }

// Threads for a block owning `items` items: ceil(items / per) rounded up to whole warps, with
// per = ceil(items / kMaxThreads) items a thread.
inline int64_t block_threads(int64_t items) {
  const int64_t per = (items + kMaxThreads - 1) / kMaxThreads;
  return ((items + per - 1) / per + kWarp - 1) / kWarp * kWarp;
}

// The one-block-per-image plan for n items, k_max picks, elem-byte values and smem_limit bytes of
// shared memory per block.
inline GreedyPlan greedy_plan(int64_t n, int64_t k_max, size_t elem, size_t smem_limit) {
  const int64_t rows = k_max > 1 ? k_max - 1 : 1;
  const size_t base = argmax_scratch_bytes(elem) + static_cast<size_t>(n) * elem;
  const size_t with_rows = base + static_cast<size_t>(rows * n) * elem;
  const bool on_chip = with_rows <= smem_limit;
  return GreedyPlan{static_cast<int>(block_threads(n)), on_chip ? with_rows : base, on_chip, 1, static_cast<int>(n)};
}

// The cluster plan: the smallest power-of-two cluster (2 .. max_cluster blocks) whose blocks hold
// their share of the Cholesky rows in smem_limit bytes; cluster = 0 when none does.
inline GreedyPlan greedy_cluster_plan(int64_t n, int64_t k_max, size_t elem, size_t smem_limit, int max_cluster) {
  const int64_t rows = k_max > 1 ? k_max - 1 : 1;
  for (int cs = 2; cs <= max_cluster && cs <= kMaxCluster; cs *= 2) {
    const int64_t slice = (n + cs - 1) / cs;
    const size_t bytes = argmax_scratch_bytes(elem) + static_cast<size_t>(rows + slice + rows * slice) * elem;
    if (bytes <= smem_limit) return GreedyPlan{static_cast<int>(block_threads(slice)), bytes, true, cs, static_cast<int>(slice)};
  }
  return GreedyPlan{0, 0, false, 0, 0};
}

// The launcher's choice for a batch on a device (compute capability major cc_major, sms SMs,
// smem_limit opt-in bytes per block): one block per image with the rows in shared memory when they
// fit; else, from sm_90 on, one cluster per image while the batch's clusters fit the SMs at once;
// else one block per image with the rows in global memory. (At launch time a cluster that
// cudaOccupancyMaxActiveClusters finds no room for still falls back to the block plan.)
inline GreedyPlan launch_plan(int64_t batch, int64_t n, int64_t k_max, size_t elem, size_t smem_limit, int cc_major,
                              int64_t sms) {
  const GreedyPlan plan = greedy_plan(n, k_max, elem, smem_limit);
  if (!plan.rows_on_chip && cc_major >= 9) {
    const GreedyPlan split = greedy_cluster_plan(n, k_max, elem, smem_limit, kMaxCluster);
    if (split.cluster > 0 && batch * split.cluster <= sms) return split;
  }
  return plan;
}

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return -CUDART_INF_F; }
template <>
__device__ __forceinline__ double neg_inf<double>() { return -CUDART_INF; }

// A residual after its update, d2 - e^2 floored at min(d2, 1), a NaN update falling to the floor,
// as the C++ path (greedy_cpu.cpp): every exact residual is >= 1, and rounding with a large gamma
// could otherwise drive them below 0 and the Cholesky rows to NaN, and picks would repeat.
template <typename T>
__device__ __forceinline__ T residual_update(T d2, T e) {
  const T left = d2 - e * e;
  const T floor = d2 < T(1) ? d2 : T(1);
  return left >= floor ? left : floor;
}

// Whether (v, i) beats (bv, bi): larger value, NaN counts as largest, ties to the lower index
// (torch.max semantics). A total order, so every lane of a butterfly ends with the same winner.
template <typename T>
__device__ __forceinline__ bool better(T v, int i, T bv, int bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn || bn) return vn && (!bn || i < bi);
  return v > bv || (v == bv && i < bi);
}

// Warp-wide argmax of the lanes' (bv, bi) pairs by butterfly: every lane ends with the winner.
template <typename T>
__device__ __forceinline__ void warp_argmax(T& bv, int& bi) {
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) {
    const T ov = __shfl_xor_sync(0xffffffffu, bv, mask);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, mask);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
}

// Block-wide argmax of d2[0:n] (item i of the block is item base + i of the image), each thread
// scanning its own items; every thread gets (j, pivot) with j an image index. One barrier: the warps' winners go to scratch slot `parity`, which the next
// call leaves alone (it uses the other slot) and the call after that may overwrite only once
// every thread has passed the next call's barrier, i.e. has finished reading this one.
template <typename T>
__device__ __forceinline__ void block_argmax(const T* d2, int n, int base, T* red_v, int* red_i, int parity, int& j,
                                             T& pivot) {
  T bv = neg_inf<T>();
  int bi = INT_MAX;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (better(d2[i], base + i, bv, bi)) {
      bv = d2[i];
      bi = base + i;
    }
  }
  warp_argmax(bv, bi);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  T* slot_v = red_v + parity * kMaxWarps;
  int* slot_i = red_i + parity * kMaxWarps;
  if (lane == 0) {
    slot_v[warp] = bv;
    slot_i[warp] = bi;
  }
  __syncthreads();  // step barrier (the only one per step of the one-block kernel)
  bv = lane < warps ? slot_v[lane] : neg_inf<T>();
  bi = lane < warps ? slot_i[lane] : INT_MAX;
  warp_argmax(bv, bi);
  j = bi;
  pivot = bv;
}

// gamma * (S[j, :] S)[i] for symmetric (n, n) S, in the C++ CPU path's order (four rows a pass).
template <typename T>
__device__ __forceinline__ T lazy_row_entry(const T* __restrict__ S, int n, int j, int i, T gamma) {
  const T* sj = S + static_cast<size_t>(j) * n;
  T acc = 0;
  int m = 0;
  for (; m + 4 <= n; m += 4) {
    const T* col = S + static_cast<size_t>(m) * n + i;
    acc += sj[m] * col[0] + sj[m + 1] * col[n] + sj[m + 2] * col[2 * n] + sj[m + 3] * col[3 * n];
  }
  for (; m < n; ++m) acc += sj[m] * S[static_cast<size_t>(m) * n + i];
  return acc * gamma;
}

// diag(L)[i] = 1 + G[i, i] (full: src is G), or 1 + gamma * ||S_i||^2 summed down column i of S
// (= row i; coalesced across threads), in the C++ CPU path's order.
template <typename T>
__device__ __forceinline__ T initial_residual(const T* __restrict__ S, int n, int i, bool full, T gamma) {
  if (full) return S[static_cast<size_t>(i) * n + i] + T(1);
  T acc = 0;
  for (int m = 0; m < n; ++m) {
    const T v = S[static_cast<size_t>(m) * n + i];
    acc += v * v;
  }
  const T norm = sqrt(acc);
  return norm * norm * gamma + T(1);
}

// One block per image runs the whole greedy (semantics and arithmetic: otprune/greedy.py and
// csrc/greedy_cpu.cpp). src: (batch, n, n), the similarity S (full = false: kernel rows formed
// per step from S) or G = gamma S S^T (full = true: row j of G read per step). RowsOnChip: the
// Cholesky rows live in shared memory after d2, else in work (batch, rows, n).
// Per step, thread x touches only its own items of d2 and of the Cholesky rows, plus entry j of
// earlier rows (written by j's owner before an earlier step barrier), so one barrier suffices.
template <typename T, bool RowsOnChip>
__global__ void __launch_bounds__(kMaxThreads)
    greedy_kernel(const T* __restrict__ src, bool full, const int64_t* __restrict__ ks,
                  const uint8_t* __restrict__ valid, int n, int k_max, int rows, T gamma, T* __restrict__ work,
                  int64_t* __restrict__ picks) {
  OTPRUNE_DYNAMIC_SHARED(unsigned char, smem);
  T* red_v = reinterpret_cast<T*>(smem);
  int* red_i = reinterpret_cast<int*>(red_v + 2 * (kMaxWarps + 1));
  T* d2 = reinterpret_cast<T*>(red_i + 2 * (kMaxWarps + 1));

  const int b = blockIdx.x;
  const T* S = src + static_cast<size_t>(b) * n * n;
  T* C = RowsOnChip ? d2 + n : work + static_cast<size_t>(b) * rows * n;
  int64_t* out = picks + static_cast<size_t>(b) * k_max;
  const uint8_t* ok = valid ? valid + static_cast<size_t>(b) * n : nullptr;
  const int k = ks ? static_cast<int>(ks[b]) : k_max;

  // d2 = diag(L), -inf at invalid tokens.
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    d2[i] = (ok && !ok[i]) ? neg_inf<T>() : initial_residual(S, n, i, full, gamma);
  }
  int j;
  T pivot;
  block_argmax(d2, n, 0, red_v, red_i, 0, j, pivot);
  if (threadIdx.x == 0) out[0] = j;

  for (int t = 0; t + 1 < k; ++t) {
    // e = (L[j, :] - C[:t, j]^T C[:t, :]) * scale;  C[t, :] = e;  d2 -= e * e;  d2[j] = -inf.
    const T scale = T(1) / sqrt(pivot);
    T* e = C + static_cast<size_t>(t) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      T acc = full ? S[static_cast<size_t>(j) * n + i] : lazy_row_entry(S, n, j, i, gamma);
      for (int r = 0; r < t; ++r) {
        const T* row = C + static_cast<size_t>(r) * n;
        acc -= row[j] * row[i];
      }
      acc *= scale;
      e[i] = acc;
      d2[i] = i == j ? neg_inf<T>() : residual_update(d2[i], acc);
    }
    block_argmax(d2, n, 0, red_v, red_i, (t + 1) & 1, j, pivot);
    if (threadIdx.x == 0) out[t + 1] = j;
  }
  for (int t = k + threadIdx.x; t < k_max; t += blockDim.x) out[t] = -1;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // clusters: sm_90 and later
// Cluster-wide argmax: each block's winner (j, pivot), known to all its threads, goes to slot
// `parity` of its shared memory; after the cluster barrier the first lanes of every warp read the
// cluster's winners through distributed shared memory and reduce them. Slot reuse as in
// block_argmax: the other slot next call, this one only after everyone passed the next barrier.
template <typename T>
__device__ __forceinline__ void cluster_argmax(const cooperative_groups::cluster_group& cluster, T* win_v, int* win_i,
                                               int parity, int& j, T& pivot) {
  if (threadIdx.x == 0) {
    win_v[parity] = pivot;
    win_i[parity] = j;
  }
  cluster.sync();
  const int lane = threadIdx.x % kWarp, blocks = static_cast<int>(cluster.num_blocks());
  T bv = neg_inf<T>();
  int bi = INT_MAX;
  if (lane < blocks) {
    bv = *cluster.map_shared_rank(win_v + parity, lane);
    bi = *cluster.map_shared_rank(win_i + parity, lane);
  }
  warp_argmax(bv, bi);
  j = bi;
  pivot = bv;
}
#endif

// The greedy for one image split over a thread-block cluster (sm_90): block r of the cluster owns
// items [r * slice, (r + 1) * slice), their residuals and their Cholesky rows in its shared memory.
// Per step: the block copies the pivot's column C[:t, j] from its owner's shared memory (distributed
// shared memory) and waits (block barrier); each thread updates its own items as in greedy_kernel;
// block argmax (block barrier), cluster argmax (cluster barrier). Rows r < t of the owner were
// written before an earlier cluster barrier, so the copy reads settled values. Grid: batch x
// cluster blocks, image b = blockIdx.x / cluster. On architectures without clusters it traps
// (the launcher never starts it there).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    greedy_cluster_kernel(const T* __restrict__ src, bool full, const int64_t* __restrict__ ks,
                          const uint8_t* __restrict__ valid, int n, int k_max, int rows, int slice, T gamma,
                          int64_t* __restrict__ picks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();
#else
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  OTPRUNE_DYNAMIC_SHARED(unsigned char, smem);
  T* red_v = reinterpret_cast<T*>(smem);  // 2 * kMaxWarps warp winners, then 2 block winners
  T* win_v = red_v + 2 * kMaxWarps;
  int* red_i = reinterpret_cast<int*>(red_v + 2 * (kMaxWarps + 1));
  int* win_i = red_i + 2 * kMaxWarps;
  T* cj = reinterpret_cast<T*>(red_i + 2 * (kMaxWarps + 1));  // rows: the pivot's column
  T* d2 = cj + rows;                                           // slice: own residuals
  T* C = d2 + slice;                                           // rows x slice: own Cholesky rows

  const int b = blockIdx.x / cluster.num_blocks();
  const int lo = rank * slice;
  const int count = n - lo < slice ? (n - lo > 0 ? n - lo : 0) : slice;
  const T* S = src + static_cast<size_t>(b) * n * n;
  int64_t* out = picks + static_cast<size_t>(b) * k_max;
  const uint8_t* ok = valid ? valid + static_cast<size_t>(b) * n : nullptr;
  const int k = ks ? static_cast<int>(ks[b]) : k_max;
  const bool writer = rank == 0 && threadIdx.x == 0;

  for (int x = threadIdx.x; x < count; x += blockDim.x) {  // as in greedy_kernel
    const int i = lo + x;
    d2[x] = (ok && !ok[i]) ? neg_inf<T>() : initial_residual(S, n, i, full, gamma);
  }
  int j;
  T pivot;
  block_argmax(d2, count, lo, red_v, red_i, 0, j, pivot);
  cluster_argmax(cluster, win_v, win_i, 0, j, pivot);
  if (writer) out[0] = j;

  for (int t = 0; t + 1 < k; ++t) {
    const T scale = T(1) / sqrt(pivot);
    const int owner = j / slice, jl = j - owner * slice;
    const T* owner_rows = cluster.map_shared_rank(C, owner);
    for (int r = threadIdx.x; r < t; r += blockDim.x) cj[r] = owner_rows[static_cast<size_t>(r) * slice + jl];
    __syncthreads();  // cj complete
    T* e = C + static_cast<size_t>(t) * slice;
    for (int x = threadIdx.x; x < count; x += blockDim.x) {
      const int i = lo + x;
      T acc = full ? S[static_cast<size_t>(j) * n + i] : lazy_row_entry(S, n, j, i, gamma);
      for (int r = 0; r < t; ++r) acc -= cj[r] * C[static_cast<size_t>(r) * slice + x];
      acc *= scale;
      e[x] = acc;
      d2[x] = i == j ? neg_inf<T>() : residual_update(d2[x], acc);
    }
    block_argmax(d2, count, lo, red_v, red_i, (t + 1) & 1, j, pivot);
    cluster_argmax(cluster, win_v, win_i, (t + 1) & 1, j, pivot);
    if (writer) out[t + 1] = j;
  }
  if (rank == 0) {
    for (int t = k + threadIdx.x; t < k_max; t += blockDim.x) out[t] = -1;
  }
  cluster.sync();  // no block may leave while another can still read its shared memory
#endif
}

}  // namespace detail
}  // namespace otprune
