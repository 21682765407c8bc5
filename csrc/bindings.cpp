// Python module otprune._C: greedy(s, ks, gamma, valid=None, full=False, stream=0) for CPU and
// (when built with WITH_CUDA) CUDA tensors. Checks arguments, allocates outputs and scratch,
// dispatches on dtype. The CUDA branch needs only the CUDA runtime header (greedy_cuda.h) besides
// torch's device-generic headers: the caller hands the CUDA stream over as an integer, so the
// branch compiles (syntax-only) against a CPU build of torch too.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>

#include "greedy_cpu.h"

#ifdef WITH_CUDA
#include "greedy_cuda.h"
#endif

namespace {

#ifdef WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// s: (B, N, N) float32/float64 symmetric similarity S, or with full = true the precomputed
// gamma * S S^T; ks: (B,) int64 CPU budgets in [1, N]; valid: optional (B, N) bool
// mask on s's device; stream: the cudaStream_t to launch on, as an integer (CUDA only; the caller
// passes torch.cuda.current_stream().cuda_stream). Returns (B, max(ks)) int64 picks in greedy
// order, -1 past ks[b], on s's device.
at::Tensor greedy(const at::Tensor& s_in, const at::Tensor& ks_in, double gamma,
                  const c10::optional<at::Tensor>& valid_in, bool full, int64_t stream_handle) {
  TORCH_CHECK(s_in.dim() == 3 && s_in.size(1) == s_in.size(2), "s must be (B, N, N), got ", s_in.sizes());
  TORCH_CHECK(s_in.scalar_type() == at::kFloat || s_in.scalar_type() == at::kDouble,
              "s must be float32 or float64, got ", s_in.scalar_type());
  const int64_t B = s_in.size(0), N = s_in.size(1);
  TORCH_CHECK(B >= 1 && N >= 1, "s must hold at least one image of at least one token, got ", s_in.sizes());
  TORCH_CHECK(ks_in.device().is_cpu() && ks_in.scalar_type() == at::kLong && ks_in.dim() == 1 && ks_in.size(0) == B,
              "ks must be a (B,) int64 CPU tensor with B = ", B);
  const at::Tensor ks = ks_in.contiguous();
  const int64_t* kp = ks.data_ptr<int64_t>();
  int64_t k_max = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(kp[b] >= 1 && kp[b] <= N, "ks[", b, "] = ", kp[b], " must lie in [1, N = ", N, "]");
    k_max = std::max(k_max, kp[b]);
  }
  const bool ragged = std::any_of(kp, kp + B, [&](int64_t k) { return k != k_max; });
  const at::Tensor s = s_in.contiguous();
  at::Tensor valid;
  if (valid_in.has_value()) {
    valid = valid_in->contiguous();
    TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == B && valid.size(1) == N &&
                    valid.device() == s.device(),
                "valid must be a (B, N) bool tensor on s's device, got ", valid.scalar_type(), " ", valid.sizes(),
                " on ", valid.device());
  }
  const uint8_t* vp = valid.defined() ? reinterpret_cast<const uint8_t*>(valid.data_ptr<bool>()) : nullptr;
  at::Tensor picks = at::empty({B, k_max}, s.options().dtype(at::kLong));
  at::Tensor work = at::empty({B, std::max<int64_t>(k_max - 1, 1), N}, s.options());

  if (s.is_cuda()) {
#ifdef WITH_CUDA
    const c10::DeviceGuard guard(s.device());
    // Ragged budgets travel through pinned memory: an asynchronous copy, no host synchronisation.
    // A CUDA graph captured with ragged budgets would re-read that staging buffer at replay: capture
    // with equal budgets (then nothing is copied) or pass a fresh call per batch.
    const at::Tensor ks_dev = ragged ? ks.pin_memory().to(s.device(), at::kLong, /*non_blocking=*/true) : at::Tensor();
    const auto stream = reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream_handle));
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "otprune_greedy_cuda", [&] {
      TORCH_CHECK(N <= otprune::cuda_max_n<scalar_t>(), "the CUDA greedy supports N <= ",
                  otprune::cuda_max_n<scalar_t>(), " for ", s.scalar_type(), ", got N = ", N);
      const cudaError_t err = otprune::greedy_cuda<scalar_t>(
          s.data_ptr<scalar_t>(), full, ragged ? ks_dev.data_ptr<int64_t>() : nullptr, vp, B, N, k_max,
          static_cast<scalar_t>(gamma), work.data_ptr<scalar_t>(), picks.data_ptr<int64_t>(), stream);
      TORCH_CHECK(err == cudaSuccess, "otprune CUDA greedy launch failed: ", cudaGetErrorString(err));
    });
    return picks;
#else
    TORCH_CHECK(false, "otprune._C was built without CUDA support");
#endif
  }
  TORCH_CHECK(s.device().is_cpu(), "s must be a CPU or CUDA tensor, got ", s.device());
  at::Tensor d2 = at::empty({B, N}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "otprune_greedy_cpu", [&] {
    otprune::greedy_cpu<scalar_t>(s.data_ptr<scalar_t>(), full, kp, vp, B, N, k_max, static_cast<scalar_t>(gamma),
                                  work.data_ptr<scalar_t>(), d2.data_ptr<scalar_t>(), picks.data_ptr<int64_t>());
  });
  return picks;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "otprune compiled greedy log-det maximisation";
  m.def("greedy", &greedy, "Greedy picks (B, max(ks)) int64 in selection order, -1 past ks[b].", py::arg("s"),
        py::arg("ks"), py::arg("gamma"), py::arg("valid") = py::none(), py::arg("full") = false, py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>());
  m.attr("with_cuda") = py::bool_(kWithCuda);
}
