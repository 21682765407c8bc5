// CPU greedy log-det maximisation on raw buffers (semantics: otprune/greedy.py).
#pragma once

#include <cstdint>

namespace otprune {

// s:     (batch, n, n) row-major, padding rows/columns zero: the symmetric similarity S (full =
//        false; each step forms the kernel row gamma * S[j, :] S itself), or the precomputed
//        gamma * S S^T, the kernel without its identity (full = true; each step copies row j).
// ks:    (batch,) budgets, 1 <= ks[b] <= min(k_max, valid count of row b).
// valid: (batch, n) mask of real tokens (1 byte each), or nullptr when all are real.
// work:  (batch, max(k_max - 1, 1), n) scratch for the Cholesky rows; d2: (batch, n) scratch.
// picks: (batch, k_max) output, greedy order, -1 past ks[b].
template <typename T>
void greedy_cpu(const T* s, bool full, const int64_t* ks, const uint8_t* valid, int64_t batch, int64_t n,
                int64_t k_max, T gamma, T* work, T* d2, int64_t* picks);

}  // namespace otprune
