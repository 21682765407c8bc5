// Host driver for the SIMT emulation: runs csrc/greedy_kernel.cuh's kernel on host threads.
//
//   driver IN OUT
// IN (little-endian): int64 elem_bytes (4 or 8), B, N, k_max, has_ks, has_valid; float64 gamma;
//   s (B, N, N) elements; ks (B,) int64 if has_ks; valid (B, N) uint8 if has_valid.
// OUT: picks (B, k_max) int64, as the CUDA launcher leaves them.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
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

template <typename T>
std::vector<int64_t> run(std::ifstream& in, int64_t B, int64_t N, int64_t k_max, bool has_ks, bool has_valid,
                         double gamma) {
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
  simt::launch(static_cast<unsigned>(B), otprune::detail::kThreads, static_cast<size_t>(N) * sizeof(T),
               [=] { otprune::detail::greedy_kernel<T>(sp, kp, vp, n, k, rows, static_cast<T>(gamma), wp, pp); });
  return picks;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  const std::vector<int64_t> h = read<int64_t>(in, 6);
  const double gamma = read<double>(in, 1)[0];
  const int64_t bytes = h[0], B = h[1], N = h[2], k_max = h[3];
  std::vector<int64_t> picks;
  if (bytes == 4) {
    picks = run<float>(in, B, N, k_max, h[4] != 0, h[5] != 0, gamma);
  } else if (bytes == 8) {
    picks = run<double>(in, B, N, k_max, h[4] != 0, h[5] != 0, gamma);
  } else {
    std::fprintf(stderr, "element size must be 4 or 8, got %lld\n", static_cast<long long>(bytes));
    return 2;
  }
  std::ofstream out(argv[2], std::ios::binary);
  out.write(reinterpret_cast<const char*>(picks.data()), static_cast<std::streamsize>(picks.size() * sizeof(int64_t)));
  return out ? 0 : 1;
}
