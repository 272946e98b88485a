// The one binding file: every op of the extension, registered as torch.ops.omniserve.*.
// Python callers use omniserve_sgl.ops, which documents shapes, dtypes and errors.
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "decode_kernel.h"

namespace omniserve {

std::tuple<torch::Tensor, torch::Tensor> paged_decode_attention(
    const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
    const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices, const torch::Tensor& kv_last_page_len,
    double sm_scale, const std::string& kv_layout, const std::string& backend,
    const std::optional<torch::Tensor>& out, const std::optional<torch::Tensor>& lse);

void append_paged_kv(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices,
                     const torch::Tensor& kv_last_page_len, const std::string& kv_layout);

std::tuple<torch::Tensor, torch::Tensor> merge_state(const torch::Tensor& v_a, const torch::Tensor& s_a,
                                                     const torch::Tensor& v_b, const torch::Tensor& s_b);

// Which decode kernel "auto" runs on this CPU: "avx512_bf16", "avx512" or "portable".
std::string decode_backend() {
#if defined(__x86_64__)
  if (decode_chunk_avx512(DType::kBFloat16, true) != decode_chunk_avx512(DType::kBFloat16, false))
    return "avx512_bf16";
  if (decode_chunk_avx512(DType::kFloat32, false) != nullptr) return "avx512";
#endif
  return "portable";
}

}  // namespace omniserve

TORCH_LIBRARY(omniserve, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_indptr, Tensor kv_indices, "
      "Tensor kv_last_page_len, float sm_scale, str kv_layout, str backend, Tensor(a!)? out, Tensor(b!)? lse) "
      "-> (Tensor, Tensor)");
  m.def(
      "append_paged_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor kv_indptr, "
      "Tensor kv_indices, Tensor kv_last_page_len, str kv_layout) -> ()");
  m.def("merge_state(Tensor v_a, Tensor s_a, Tensor v_b, Tensor s_b) -> (Tensor, Tensor)");
  m.def("decode_backend() -> str", &omniserve::decode_backend);
}

// CompositeExplicitAutograd: one implementation for every device key, so a tensor on the wrong
// device reaches our own check (and its message) instead of a dispatcher error.
TORCH_LIBRARY_IMPL(omniserve, CompositeExplicitAutograd, m) {
  m.impl("paged_decode_attention", &omniserve::paged_decode_attention);
  m.impl("append_paged_kv", &omniserve::append_paged_kv);
  m.impl("merge_state", &omniserve::merge_state);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}  // importing the module runs the registrations above
