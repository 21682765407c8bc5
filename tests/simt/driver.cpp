// Host driver for the SIMT emulation: runs csrc/greedy_kernel.cuh's kernel on host threads.
//
//   driver IN OUT
// IN (little-endian): int64 elem_bytes (4 or 8), B, N, k_max, has_ks, has_valid, full, smem_limit,
//   max_cluster; float64 gamma; src (B, N, N) elements (S, or G = gamma S S^T when full); ks (B,)
//   int64 if has_ks; valid (B, N) uint8 if has_valid. The launch follows greedy_plan() (max_cluster
//   0) or greedy_cluster_plan() as the CUDA launcher does, with smem_limit standing for the device's
//   opt-in shared memory per block.
// OUT: picks (B, k_max) int64, as the CUDA launcher leaves them.
//   driver --plan N K_MAX ELEM_BYTES SMEM_LIMIT MAX_CLUSTER
// prints that launch plan: threads, dynamic shared memory bytes, rows on chip (0/1), cluster, slice.
//   driver --launch B N K_MAX ELEM_BYTES SMEM_LIMIT CC_MAJOR SMS
// prints, in the same form, the plan the CUDA launcher chooses for a batch on such a device
// (launch_plan).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "greedy_kernel.cuh"

namespace {

template <typename V>
std::vector<V> read(std::ifstream& in, size_t count) {
  std::vector<V> v(count);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(count * sizeof(V)));
  if (!in) throw std::runtime_error("input file too short");
  return v;
}

otprune::detail::GreedyPlan make_plan(int64_t n, int64_t k_max, size_t elem, size_t smem_limit, int max_cluster) {
  if (max_cluster == 0) return otprune::detail::greedy_plan(n, k_max, elem, smem_limit);
  const otprune::detail::GreedyPlan plan = otprune::detail::greedy_cluster_plan(n, k_max, elem, smem_limit, max_cluster);
  if (plan.cluster == 0) throw std::runtime_error("no cluster plan fits the shared memory limit");
  return plan;
}

template <typename T>
std::vector<int64_t> run(std::ifstream& in, int64_t B, int64_t N, int64_t k_max, bool has_ks, bool has_valid,
                         bool full, size_t smem_limit, int max_cluster, double gamma) {
  const std::vector<T> s = read<T>(in, static_cast<size_t>(B * N * N));
  const std::vector<int64_t> ks = has_ks ? read<int64_t>(in, static_cast<size_t>(B)) : std::vector<int64_t>();
  const std::vector<uint8_t> valid = has_valid ? read<uint8_t>(in, static_cast<size_t>(B * N)) : std::vector<uint8_t>();
  const int rows = static_cast<int>(k_max > 1 ? k_max - 1 : 1);
  std::vector<T> work(static_cast<size_t>(B * rows * N));
  std::vector<int64_t> picks(static_cast<size_t>(B * k_max), -7);
  const T* sp = s.data();
  const int64_t* kp = has_ks ? ks.data() : nullptr;
  const uint8_t* vp = has_valid ? valid.data() : nullptr;
  T* wp = work.data();
  int64_t* pp = picks.data();
  const int n = static_cast<int>(N), k = static_cast<int>(k_max);
  const T g = static_cast<T>(gamma);
  const otprune::detail::GreedyPlan plan = make_plan(N, k_max, sizeof(T), smem_limit, max_cluster);
  if (plan.smem_bytes > smem_limit) throw std::runtime_error("the plan exceeds the shared memory limit");
  const unsigned grid = static_cast<unsigned>(B), threads = static_cast<unsigned>(plan.threads);
  if (plan.cluster > 1) {
    const unsigned cs = static_cast<unsigned>(plan.cluster);
    const int slice = plan.slice;
    simt::launch(grid * cs, threads, plan.smem_bytes,
                 [=] { otprune::detail::greedy_cluster_kernel<T>(sp, full, kp, vp, n, k, rows, slice, g, pp); }, cs);
  } else if (plan.rows_on_chip) {
    simt::launch(grid, threads, plan.smem_bytes,
                 [=] { otprune::detail::greedy_kernel<T, true>(sp, full, kp, vp, n, k, rows, g, wp, pp); });
  } else {
    simt::launch(grid, threads, plan.smem_bytes,
                 [=] { otprune::detail::greedy_kernel<T, false>(sp, full, kp, vp, n, k, rows, g, wp, pp); });
  }
  return picks;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 9 && std::string(argv[1]) == "--launch") {  // B N K_MAX ELEM SMEM_LIMIT CC_MAJOR SMS
    const otprune::detail::GreedyPlan plan = otprune::detail::launch_plan(
        std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]), static_cast<size_t>(std::atoll(argv[5])),
        static_cast<size_t>(std::atoll(argv[6])), std::atoi(argv[7]), std::atoll(argv[8]));
    std::printf("%d %zu %d %d %d\n", plan.threads, plan.smem_bytes, plan.rows_on_chip ? 1 : 0, plan.cluster, plan.slice);
    return 0;
  }
  if (argc == 7 && std::string(argv[1]) == "--plan") {
    const otprune::detail::GreedyPlan plan =
        make_plan(std::atoll(argv[2]), std::atoll(argv[3]), static_cast<size_t>(std::atoll(argv[4])),
                  static_cast<size_t>(std::atoll(argv[5])), std::atoi(argv[6]));
    std::printf("%d %zu %d %d %d\n", plan.threads, plan.smem_bytes, plan.rows_on_chip ? 1 : 0, plan.cluster, plan.slice);
    return 0;
  }
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  const std::vector<int64_t> h = read<int64_t>(in, 9);
  const double gamma = read<double>(in, 1)[0];
  const int64_t bytes = h[0], B = h[1], N = h[2], k_max = h[3];
  std::vector<int64_t> picks;
  if (bytes == 4) {
    picks = run<float>(in, B, N, k_max, h[4] != 0, h[5] != 0, h[6] != 0, static_cast<size_t>(h[7]), static_cast<int>(h[8]), gamma);
  } else if (bytes == 8) {
    picks = run<double>(in, B, N, k_max, h[4] != 0, h[5] != 0, h[6] != 0, static_cast<size_t>(h[7]), static_cast<int>(h[8]), gamma);
  } else {
    std::fprintf(stderr, "element size must be 4 or 8, got %lld\n", static_cast<long long>(bytes));
    return 2;
  }
  std::ofstream out(argv[2], std::ios::binary);
  out.write(reinterpret_cast<const char*>(picks.data()), static_cast<std::streamsize>(picks.size() * sizeof(int64_t)));
  return out ? 0 : 1;
}
