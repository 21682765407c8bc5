// CUDA greedy log-det maximisation with incremental Cholesky: one thread block per image runs
// the whole k-step loop in a single launch. Residuals d2 live in shared memory, the Cholesky rows
// in the caller's global workspace. Arithmetic follows otprune/greedy.py in the dtype T.
#include "greedy_cuda.h"
#include "greedy_kernel.cuh"

#include <climits>

namespace otprune {

using detail::greedy_kernel;
using detail::kThreads;


template <typename T>
cudaError_t greedy_cuda(const T* s, const int64_t* ks, const uint8_t* valid, int64_t batch, int64_t n,
                        int64_t k_max, T gamma, T* work, int64_t* picks, cudaStream_t stream) {
  if (n < 1 || n > cuda_max_n<T>() || k_max < 1 || k_max > n || batch < 0 || batch > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0) return cudaSuccess;
  const int rows = static_cast<int>(k_max > 1 ? k_max - 1 : 1);
  const size_t shared = static_cast<size_t>(n) * sizeof(T);
  greedy_kernel<T><<<static_cast<unsigned>(batch), kThreads, shared, stream>>>(
      s, ks, valid, static_cast<int>(n), static_cast<int>(k_max), rows, gamma, work, picks);
  return cudaGetLastError();
}

template cudaError_t greedy_cuda<float>(const float*, const int64_t*, const uint8_t*, int64_t, int64_t, int64_t,
                                        float, float*, int64_t*, cudaStream_t);
template cudaError_t greedy_cuda<double>(const double*, const int64_t*, const uint8_t*, int64_t, int64_t,
                                         int64_t, double, double*, int64_t*, cudaStream_t);

}  // namespace otprune
