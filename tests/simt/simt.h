// A small SIMT emulation: runs CUDA kernel source (csrc/greedy_kernel.cuh) on host threads.
//
// Included before the kernel header (g++ -std=c++20 -include simt.h). Each CUDA thread of a block
// is one std::thread; blocks run one after another (so a static __shared__ array, mapped to a
// function-local static, is per block). __syncthreads() is a per-block std::barrier;
// __shfl_*_sync exchanges values through a per-warp 32-slot row guarded by a per-warp barrier, so
// all 32 lanes must take part (full mask only, as in CUDA with a full mask). Dynamic shared memory
// is a heap buffer of exactly the launch's byte count, filled with a junk pattern, so that
// AddressSanitizer sees an out-of-bounds index and an uninitialised read changes results.
// Not covered: clusters, cooperative groups, atomics, warp-synchronous code without __syncwarp.
#pragma once

#include <math.h>

#include <barrier>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace simt {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// State of the block being run (set before its threads start, so thread creation orders it).
struct Block {
  std::unique_ptr<std::barrier<>> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  std::vector<uint64_t> exchange;  // warps x 32 slots
  std::unique_ptr<unsigned char[]> smem;
};
inline Block block;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "simt: %s\n", what);
  std::abort();
}

// Every lane writes its value, waits, reads lane src's value, waits (the row is reused next call).
template <typename T>
T exchange(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  if (mask != kFullMask) fail("only full-mask shuffles are emulated");
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  uint64_t* row = block.exchange.data() + warp * kWarp;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  row[lane] = bits;
  block.warp_sync[warp]->arrive_and_wait();
  T out;
  std::memcpy(&out, &row[src], sizeof(T));
  block.warp_sync[warp]->arrive_and_wait();
  return out;
}

// Runs kernel() for every block of grid x threads, with smem_bytes of dynamic shared memory.
template <typename F>
void launch(unsigned grid, unsigned threads, size_t smem_bytes, F kernel) {
  if (threads == 0 || threads % kWarp != 0 || threads > 1024) fail("block size must be a multiple of 32, <= 1024");
  for (unsigned b = 0; b < grid; ++b) {
    block.sync = std::make_unique<std::barrier<>>(threads);
    block.warp_sync.clear();
    for (unsigned w = 0; w < threads / kWarp; ++w) block.warp_sync.push_back(std::make_unique<std::barrier<>>(kWarp));
    block.exchange.assign(threads, 0);
    block.smem.reset(smem_bytes ? new unsigned char[smem_bytes] : nullptr);
    if (smem_bytes) std::memset(block.smem.get(), 0xA5, smem_bytes);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([=] {
        threadIdx = dim3{t, 1, 1};
        blockIdx = dim3{b, 1, 1};
        blockDim = dim3{threads, 1, 1};
        gridDim = dim3{grid, 1, 1};
        kernel();
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace simt

inline void __syncthreads() { simt::block.sync->arrive_and_wait(); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane) {
  return simt::exchange(mask, v, src_lane % simt::kWarp);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  const int lane = threadIdx.x % simt::kWarp;
  const int src = lane + static_cast<int>(delta);
  return simt::exchange(mask, v, src < simt::kWarp ? src : lane);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return simt::exchange(mask, v, (static_cast<int>(threadIdx.x % simt::kWarp) ^ lane_mask) % simt::kWarp);
}

inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }

// Dynamic shared memory of the running block (csrc/greedy_kernel.cuh declares it through this).
#define OTPRUNE_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(simt::block.smem.get())
