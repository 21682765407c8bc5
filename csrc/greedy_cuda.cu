// CUDA greedy log-det maximisation with incremental Cholesky: one launch per batch, one thread
// block (or one thread-block cluster) per image running the whole k-step loop (kernels:
// greedy_kernel.cuh). Untested on GPU: the kernel source runs on the CPU under a SIMT emulation
// (tests/test_simt.py) and ptxas checks registers, spills and shared memory
// (tests/test_cuda_sources.py); no GPU has run it.
//
// Design, per image (N tokens, k picks, S the (N, N) fp32 similarity):
// - Kernel rows: "full" form when G = gamma S S^T fits memory: one GEMM before this launch (the
//   caller's: otprune/backends/cuda_ext.py takes the Triton split-fp16 tensor-core triangle GEMM,
//   or cuBLAS fp32 with TF32 off for float64 / without Triton), then step t reads row j of G
//   (N x 4 bytes) instead of forming it from S (N^2 x 4 bytes); the "lazy" form (row formed from S
//   per step) stays for when G does not fit.
// - Cholesky rows (k - 1 rows of N) in shared memory while they fit one block's opt-in limit
//   (cudaFuncSetAttribute; N = 576, k = 56: 129 KB). Otherwise, on sm_90 while the batch's
//   clusters fit the SMs at once, the image is split over a cluster of 2-16 blocks, each holding its
//   N / cluster columns of the rows (N = 2880, k = 282: 16 blocks x 200 KB) and reading the pivot's
//   column from its owner through distributed shared memory; else one block per image with the
//   rows in a global workspace (L2-resident).
// - Block size from the items a block owns so that every thread owns the same number of items
//   (576 -> 576 threads x 1, 2880 -> 960 x 3): no tail pass. Residuals d2 in shared memory, each
//   thread reading and writing only its own items; one __syncthreads per step in the one-block
//   kernel (argmax with double-buffered scratch); two block barriers and one cluster barrier per
//   step in the cluster kernel.
// - No allocation, no host synchronisation: the caller hands over every buffer and the stream
//   (the launcher queries device attributes and sets function attributes, which do not sync).
//
// Cost bound (per image unless stated; fp32 greedy state; d = 4096 enters only the similarity,
// which is not this file's). Peaks used, H100 SXM: 3.35 TB/s HBM, 67 TFLOP/s fp32 (non-tensor),
// 989 TFLOP/s dense fp16 tensor, 50 MB L2, 132 SMs, 227 KB opt-in shared memory per block; per SM
// ~250 GB/s shared memory (128 B/clk) and ~110 GB/s from L2 (64 B/clk); ~1 us per dependent step
// of one block (barrier, a dependent L2 load of a kernel row, warp shuffles), ~1.5-2 us for a
// cluster step (a cluster barrier and a distributed-shared-memory read more). H200: 4.8 TB/s HBM,
// same compute, SMs and L2; no term below is HBM-bound, so its bounds equal H100's.
//                              N = 576, k = 56            N = 2880, k = 282
//   GEMM G, split-fp16 (3 x 2 N^3 FLOP over the upper block triangle, tensor cores; the caller's)
//                              0.64 GFLOP -> 0.6 us       73 GFLOP -> 74 us
//     (fp32 cuBLAS fallback)   0.38 GFLOP -> 5.7 us       47.8 GFLOP -> 0.71 ms
//     bytes (read S, write G)  2.7 MB -> 0.8 us           66 MB -> 20 us
//   kernel rows read (k N 4 B) 0.13 MB                    3.2 MB
//   Cholesky traffic (k^2/2 N 4 B)
//                              3.4 MB, one SM's shared    453 MB: one SM via L2 -> 4.1 ms;
//                              memory -> 14 us            cluster of 16, on chip -> 0.11 ms
//   dependent steps (k - 1)    55 -> 55 us                281 -> 0.28 ms (block), 0.42-0.56 ms
//                                                         (cluster)
//   lazy form instead of G     1.3 MB of S per step via one SM -> 0.66 ms; 33 MB -> 85 ms
// Lower bound of this launch (otprune/cost_model.py, backend "cuda", phase "greedy": the greedy's
// largest traffic term plus its dependent steps and 1 us for the kernel; the batch's blocks or
// clusters run concurrently, so it does not grow with B while they fit the SMs at once):
//   N = 576:  ~70 us at B = 1, 8 and 32 (14 us of shared-memory traffic + 55 steps).
//   N = 2880: B = 1 and 8: 0.11 + 0.42 = ~0.54 ms (a cluster of 16 per image, 128 SMs at B = 8);
//             B = 32: 32 clusters do not fit at once, one block per image with the rows in L2/HBM:
//             ~4.6 ms.
// The whole select call (bench/results/model.md) adds the input check, the Triton similarity, G and
// the sort: 99 us at N = 576 and 0.76 ms at N = 2880 (B = 1), within 100 us and 1 ms in the model;
// with the fp32 fallback 140 us and 2.3 ms. Not modelled: whether the GPU can co-schedule a
// 16-block cluster with 200 KB of shared memory per block (the launcher asks
// cudaOccupancyMaxActiveClusters and falls back to one block per image if not).
#include "greedy_cuda.h"

#include <climits>

#include "greedy_kernel.cuh"

namespace otprune {

namespace {

// One block per image: Cholesky rows in shared memory when they fit, else in `work`.
template <typename T>
cudaError_t launch_blocks(const detail::GreedyPlan& plan, const T* src, bool full, const int64_t* ks,
                          const uint8_t* valid, int64_t batch, int n, int k_max, T gamma, T* work, int64_t* picks,
                          cudaStream_t stream) {
  const int rows = k_max > 1 ? k_max - 1 : 1;
  auto* kernel = plan.rows_on_chip ? detail::greedy_kernel<T, true> : detail::greedy_kernel<T, false>;
  if (plan.smem_bytes > 48 * 1024) {  // above the default: opt in (no synchronisation)
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(batch), plan.threads, plan.smem_bytes, stream>>>(src, full, ks, valid, n, k_max, rows,
                                                                                    gamma, work, picks);
  return cudaGetLastError();
}

// One cluster per image (sm_90). Returns cudaErrorNotSupported, launching nothing, when the cluster
// cannot be set up (an attribute refused, or cudaOccupancyMaxActiveClusters finds no room for one
// such cluster), so that the caller falls back to one block per image.
template <typename T>
cudaError_t launch_clusters(const detail::GreedyPlan& plan, const T* src, bool full, const int64_t* ks,
                            const uint8_t* valid, int64_t batch, int n, int k_max, T gamma, int64_t* picks,
                            cudaStream_t stream) {
  const int rows = k_max > 1 ? k_max - 1 : 1;
  auto* kernel = detail::greedy_cluster_kernel<T>;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(plan.cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(batch * plan.cluster));
  config.blockDim = dim3(static_cast<unsigned>(plan.threads));
  config.dynamicSmemBytes = plan.smem_bytes;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
  if (err == cudaSuccess && plan.cluster > 8) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  }
  int clusters = 0;
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
  if (err != cudaSuccess || clusters < 1) {
    cudaGetLastError();  // these errors are not sticky; keep them from surfacing as the fallback's
    return cudaErrorNotSupported;
  }
  err = cudaLaunchKernelEx(&config, kernel, src, full, ks, valid, n, k_max, rows, plan.slice, gamma, picks);
  return err == cudaSuccess ? cudaGetLastError() : err;
}

}  // namespace

template <typename T>
cudaError_t greedy_cuda(const T* src, bool full, const int64_t* ks, const uint8_t* valid, int64_t batch, int64_t n,
                        int64_t k_max, T gamma, T* work, int64_t* picks, cudaStream_t stream) {
  if (n < 1 || n > cuda_max_n<T>() || k_max < 1 || k_max > n || batch < 0 || batch > INT_MAX / detail::kMaxCluster) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0) return cudaSuccess;
  int device = 0, smem_optin = 0, major = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const size_t limit = static_cast<size_t>(smem_optin);
  const detail::GreedyPlan plan = detail::launch_plan(batch, n, k_max, sizeof(T), limit, major, sms);
  if (plan.cluster > 1) {
    err = launch_clusters(plan, src, full, ks, valid, batch, static_cast<int>(n), static_cast<int>(k_max), gamma,
                          picks, stream);
    if (err != cudaErrorNotSupported) return err;
  }
  // One block per image (also the fall-back when the cluster cannot be scheduled).
  return launch_blocks(detail::greedy_plan(n, k_max, sizeof(T), limit), src, full, ks, valid, batch,
                       static_cast<int>(n), static_cast<int>(k_max), gamma, work, picks, stream);
}

template cudaError_t greedy_cuda<float>(const float*, bool, const int64_t*, const uint8_t*, int64_t, int64_t,
                                        int64_t, float, float*, int64_t*, cudaStream_t);
template cudaError_t greedy_cuda<double>(const double*, bool, const int64_t*, const uint8_t*, int64_t, int64_t,
                                         int64_t, double, double*, int64_t*, cudaStream_t);

}  // namespace otprune
