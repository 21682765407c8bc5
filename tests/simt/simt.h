// A small SIMT emulation: runs CUDA kernel source (csrc/greedy_kernel.cuh) on host threads.
//
// Included before the kernel header (g++ -std=c++20 -include simt.h). Each CUDA thread is one
// std::thread. Blocks run one after another, except the blocks of one thread-block cluster, which
// run concurrently. __syncthreads() is a per-block std::barrier; __shfl_*_sync exchanges values
// through a per-warp 32-slot row guarded by a per-warp barrier, so all 32 lanes must take part
// (full mask only, as in CUDA with a full mask). Dynamic shared memory is a heap buffer of exactly
// the launch's byte count, filled with a junk pattern, so that AddressSanitizer sees an
// out-of-bounds index and an uninitialised read changes results. Clusters (cooperative_groups'
// this_cluster()): sync() is a barrier over every thread of the cluster, map_shared_rank() maps a
// pointer into this block's dynamic shared memory to the same offset in another block's (an
// address outside it aborts). A static __shared__ variable becomes a function-local static: one
// copy for all blocks, which is wrong when blocks of a cluster run concurrently, so kernels
// launched in clusters must keep all shared memory dynamic.
// Not covered: grid-wide cooperative groups, atomics, warp-synchronous code without __syncwarp.
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

// One block's state; its threads find it through `block` (thread_local).
struct Block {
  std::unique_ptr<std::barrier<>> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  std::vector<uint64_t> exchange;  // warps x 32 slots
  std::unique_ptr<unsigned char[]> smem;
  size_t smem_bytes = 0;
};

// One cluster's state: a barrier over all its threads and its blocks' shared memory.
struct Cluster {
  std::unique_ptr<std::barrier<>> sync;
  std::vector<Block*> blocks;
};

inline thread_local Block* block = nullptr;
inline thread_local Cluster* cluster = nullptr;
inline thread_local unsigned cluster_rank = 0;

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
  uint64_t* row = block->exchange.data() + warp * kWarp;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  row[lane] = bits;
  block->warp_sync[warp]->arrive_and_wait();
  T out;
  std::memcpy(&out, &row[src], sizeof(T));
  block->warp_sync[warp]->arrive_and_wait();
  return out;
}

// Runs kernel() for a grid of `grid` blocks of `threads` threads with smem_bytes of dynamic shared
// memory each, in clusters of cluster_size consecutive blocks (1: plain launch).
template <typename F>
void launch(unsigned grid, unsigned threads, size_t smem_bytes, F kernel, unsigned cluster_size = 1) {
  if (threads == 0 || threads % kWarp != 0 || threads > 1024) fail("block size must be a multiple of 32, <= 1024");
  if (cluster_size == 0 || grid % cluster_size != 0) fail("grid must be a multiple of the cluster size");
  for (unsigned first = 0; first < grid; first += cluster_size) {
    std::vector<std::unique_ptr<Block>> blocks;
    Cluster group;
    group.sync = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(threads) * cluster_size);
    for (unsigned r = 0; r < cluster_size; ++r) {
      auto blk = std::make_unique<Block>();
      blk->sync = std::make_unique<std::barrier<>>(threads);
      for (unsigned w = 0; w < threads / kWarp; ++w) blk->warp_sync.push_back(std::make_unique<std::barrier<>>(kWarp));
      blk->exchange.assign(threads, 0);
      blk->smem.reset(smem_bytes ? new unsigned char[smem_bytes] : nullptr);
      blk->smem_bytes = smem_bytes;
      if (smem_bytes) std::memset(blk->smem.get(), 0xA5, smem_bytes);
      group.blocks.push_back(blk.get());
      blocks.push_back(std::move(blk));
    }
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads) * cluster_size);
    for (unsigned r = 0; r < cluster_size; ++r) {
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([=, &group] {
          block = group.blocks[r];
          cluster = &group;
          cluster_rank = r;
          threadIdx = dim3{t, 1, 1};
          blockIdx = dim3{first + r, 1, 1};
          blockDim = dim3{threads, 1, 1};
          gridDim = dim3{grid, 1, 1};
          kernel();
        });
      }
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace simt

inline void __syncthreads() { simt::block->sync->arrive_and_wait(); }

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
#define OTPRUNE_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(simt::block->smem.get())

inline void __trap() { simt::fail("__trap() reached"); }

// The part of cooperative_groups' cluster API the kernel uses.
namespace cooperative_groups {
struct cluster_group {
  void sync() const { simt::cluster->sync->arrive_and_wait(); }
  unsigned block_rank() const { return simt::cluster_rank; }
  unsigned num_blocks() const { return static_cast<unsigned>(simt::cluster->blocks.size()); }
  template <typename T>
  T* map_shared_rank(T* addr, int rank) const {
    const auto* base = simt::block->smem.get();
    const auto* p = reinterpret_cast<const unsigned char*>(addr);
    if (p < base || p >= base + simt::block->smem_bytes) simt::fail("map_shared_rank of an address outside shared memory");
    if (rank < 0 || rank >= static_cast<int>(num_blocks())) simt::fail("map_shared_rank to a rank outside the cluster");
    return reinterpret_cast<T*>(simt::cluster->blocks[rank]->smem.get() + (p - base));
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups
