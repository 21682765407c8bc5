// CUDA greedy log-det maximisation on raw device buffers (semantics: otprune/greedy.py).
// Free of torch headers so that it compiles with plain nvcc. Design and cost bound: greedy_cuda.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace otprune {

// Largest n the kernel accepts: its residuals d2 (n values) and argmax scratch live in the 48 KiB
// of shared memory every block gets without opting in (the Cholesky rows join them when they fit
// the device's opt-in limit).
template <typename T>
constexpr int64_t cuda_max_n() {
  return (47 * 1024) / sizeof(T);
}

// One thread block, or on sm_90 one thread-block cluster, per image runs all greedy steps; one
// launch, no allocation, no host sync.
// src:   (batch, n, n) row-major, padding rows/columns zero: the symmetric similarity S (full =
//        false: each step forms gamma * S[j, :] S) or G = gamma * S S^T (full = true: each step
//        reads row j of G).
// ks:    (batch,) budgets on the device, 1 <= ks[b] <= min(k_max, valid count), or nullptr: all k_max.
// valid: (batch, n) device mask of real tokens (1 byte each), or nullptr when all are real.
// work:  (batch, max(k_max - 1, 1), n) device scratch for the Cholesky rows (left unused when they
//        fit in shared memory, of one block or of a cluster).
// picks: (batch, k_max) device output, greedy order, -1 past ks[b].
// Returns the launch status (cudaErrorInvalidValue when n > cuda_max_n<T>()).
template <typename T>
cudaError_t greedy_cuda(const T* src, bool full, const int64_t* ks, const uint8_t* valid, int64_t batch, int64_t n,
                        int64_t k_max, T gamma, T* work, int64_t* picks, cudaStream_t stream);

}  // namespace otprune
