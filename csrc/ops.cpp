// The one binding file: every op of the extension, registered as torch.ops.omniserve.*.
// Python callers use omniserve_sgl.ops, which documents shapes, dtypes and errors.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "decode_kernel.h"
#include "doorbell.h"
#include "host_ops.h"

namespace omniserve {

// Which decode kernel "auto" runs on this CPU: "avx512_bf16", "avx512" or "portable".
std::string decode_backend() {
#if defined(__x86_64__)
  bool bf16_dot = false;
  if (decode_chunk_avx512(DType::kBFloat16, true, &bf16_dot) != nullptr) return bf16_dot ? "avx512_bf16" : "avx512";
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

// Importing the module runs the registrations above; the doorbell loop is a plain Python class of
// the worker (it holds state across calls, which an op cannot).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  auto loop = pybind11::class_<omniserve::DoorbellLoop>(m, "DoorbellLoop");
  loop.attr("IDLE") = static_cast<int64_t>(omniserve::DoorbellLoop::kIdle);  // what serve() returns first
  loop.attr("REPLY") = static_cast<int64_t>(omniserve::DoorbellLoop::kReply);
  loop.attr("PYTHON") = static_cast<int64_t>(omniserve::DoorbellLoop::kPython);
  loop
      .def(pybind11::init<const std::vector<std::vector<torch::Tensor>>&, const std::vector<std::string>&,
                          const std::vector<std::string>&, const std::vector<std::string>&,
                          const std::vector<std::string>&, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::string, torch::Tensor, double>())
      .def("serve", &omniserve::DoorbellLoop::serve)
      .def_property_readonly("plans_made", &omniserve::DoorbellLoop::plans_made);

  // FlashInfer's plan/run split of paged decode attention (omniserve_sgl.ops.PagedDecodePlan).
  pybind11::class_<omniserve::DecodePlan>(m, "DecodePlan")
      .def(pybind11::init(&omniserve::plan_paged_decode))
      .def_readonly("batch", &omniserve::DecodePlan::batch)
      .def_property_readonly("num_items", [](const omniserve::DecodePlan& p) { return p.items.size(); })
      .def("run", &omniserve::run_paged_decode, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("append", &omniserve::run_append_paged_kv, pybind11::call_guard<pybind11::gil_scoped_release>());
}
