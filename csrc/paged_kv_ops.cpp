// append_paged_kv (write each sequence's newest K/V row into its last page; planned or one-shot) and merge_state
// (combine two partial attention results by their LSE).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/types.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>

#include "checks.h"
#include "host_ops.h"

namespace omniserve {

void run_append_paged_kv(const DecodePlan& plan, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& k_cache, const torch::Tensor& v_cache, const std::string& kv_layout) {
  const Layout layout = parse_layout(kv_layout);
  const CacheShape c = check_caches(k_cache, v_cache, layout);
  for (const auto* t : {&k, &v}) {
    const char* name = t == &k ? "k" : "v";
    check_cpu(*t, name);
    check_dim(*t, 3, name, "[B, H_kv, D]");
    TORCH_CHECK_TYPE(t->scalar_type() == k_cache.scalar_type(), name, " must have the KV cache's dtype (",
                     k_cache.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->size(1) == c.num_kv_heads && t->size(2) == c.head_dim, name, " must have shape [B, ",
                      c.num_kv_heads, ", ", c.head_dim, "] to match the KV cache, got ", t->sizes());
  }
  TORCH_CHECK_VALUE(k.size(0) == v.size(0), "k and v must have the same batch size, got ", k.size(0), " and ",
                    v.size(0));
  const int64_t batch = k.size(0);
  TORCH_CHECK_VALUE(batch == plan.batch, "k has ", batch, " rows but the plan was made for ", plan.batch);
  TORCH_CHECK_VALUE(c.num_pages == plan.num_pages && c.page_size == plan.page_size, "the plan was made for a cache of ",
                    plan.num_pages, " pages of ", plan.page_size, " tokens, this one has ", c.num_pages, " of ",
                    c.page_size);
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK_VALUE(plan.last_page[b] >= 0, "sequence ", b, " has no pages: the metadata must already count the "
                      "token being appended (kv_indptr/kv_last_page_len as after the append)");
  const torch::Tensor kc = k.contiguous(), vc = v.contiguous();
  const PagedKV kv = paged_kv_view(k_cache, v_cache, c, layout, plan.kv_indices.data());
  const int64_t eb = k.element_size(), row_bytes = c.head_dim * eb;
  char* kdst = static_cast<char*>(k_cache.data_ptr());
  char* vdst = static_cast<char*>(v_cache.data_ptr());
  const char* ksrc = static_cast<const char*>(kc.data_ptr());
  const char* vsrc = static_cast<const char*>(vc.data_ptr());
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t page = plan.last_page[b], off = plan.last_offset[b];
      for (int64_t h = 0; h < c.num_kv_heads; ++h) {
        const int64_t dst = (page * kv.page_stride + off * kv.token_stride + h * kv.head_stride) * eb;
        const int64_t src = (b * c.num_kv_heads + h) * row_bytes;
        std::memcpy(kdst + dst, ksrc + src, row_bytes);
        std::memcpy(vdst + dst, vsrc + src, row_bytes);
      }
    }
  });
}

void append_paged_kv(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices,
                     const torch::Tensor& kv_last_page_len, const std::string& kv_layout) {
  const CacheShape c = check_caches(k_cache, v_cache, parse_layout(kv_layout));
  run_append_paged_kv(plan_paged_decode(kv_indptr, kv_indices, kv_last_page_len, c.num_pages, c.page_size), k, v,
                      k_cache, v_cache, kv_layout);
}

namespace {

template <typename T>
void merge_rows(const T* va, const float* sa, const T* vb, const float* sb, T* v, float* s, int64_t rows,
                int64_t D) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float a = sa[r], b = sb[r];
      const float mx = std::max(a, b);
      if (mx == -std::numeric_limits<float>::infinity()) {  // both states empty
        for (int64_t d = 0; d < D; ++d) v[r * D + d] = T(0.f);
        s[r] = mx;
        continue;
      }
      const float wa = std::exp(a - mx), wb = std::exp(b - mx), inv = 1.f / (wa + wb);
      for (int64_t d = 0; d < D; ++d)
        v[r * D + d] = T((wa * static_cast<float>(va[r * D + d]) + wb * static_cast<float>(vb[r * D + d])) * inv);
      s[r] = mx + std::log(wa + wb);
    }
  });
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> merge_state(const torch::Tensor& v_a, const torch::Tensor& s_a,
                                                     const torch::Tensor& v_b, const torch::Tensor& s_b) {
  for (const auto* t : {&v_a, &s_a, &v_b, &s_b}) check_cpu(*t, "merge_state's inputs");
  check_dim(v_a, 3, "v_a", "[N, H, D]");
  TORCH_CHECK_VALUE(v_a.sizes() == v_b.sizes(), "v_a and v_b must have the same shape, got ", v_a.sizes(), " and ",
                    v_b.sizes());
  TORCH_CHECK_TYPE(v_a.scalar_type() == v_b.scalar_type(), "v_a and v_b must have the same dtype, got ",
                   v_a.scalar_type(), " and ", v_b.scalar_type());
  dtype_of(v_a, "v_a");
  for (const auto* t : {&s_a, &s_b}) {
    const char* name = t == &s_a ? "s_a" : "s_b";
    TORCH_CHECK_TYPE(t->scalar_type() == torch::kFloat32, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == v_a.size(0) && t->size(1) == v_a.size(1), name,
                      " must have shape [N, H] = [", v_a.size(0), ", ", v_a.size(1), "], got ", t->sizes());
  }
  const torch::Tensor va = v_a.contiguous(), vb = v_b.contiguous(), sa = s_a.contiguous(), sb = s_b.contiguous();
  torch::Tensor v = torch::empty_like(va);
  torch::Tensor s = torch::empty_like(sa);
  const int64_t rows = va.size(0) * va.size(1), D = va.size(2);
  switch (dtype_of(va, "v_a")) {
    case DType::kFloat32:
      merge_rows(va.data_ptr<float>(), sa.data_ptr<float>(), vb.data_ptr<float>(), sb.data_ptr<float>(),
                 v.data_ptr<float>(), s.data_ptr<float>(), rows, D);
      break;
    case DType::kFloat16:
      merge_rows(reinterpret_cast<const c10::Half*>(va.data_ptr()), sa.data_ptr<float>(),
                 reinterpret_cast<const c10::Half*>(vb.data_ptr()), sb.data_ptr<float>(),
                 reinterpret_cast<c10::Half*>(v.data_ptr()), s.data_ptr<float>(), rows, D);
      break;
    case DType::kBFloat16:
      merge_rows(reinterpret_cast<const c10::BFloat16*>(va.data_ptr()), sa.data_ptr<float>(),
                 reinterpret_cast<const c10::BFloat16*>(vb.data_ptr()), sb.data_ptr<float>(),
                 reinterpret_cast<c10::BFloat16*>(v.data_ptr()), s.data_ptr<float>(), rows, D);
      break;
  }
  return {v, s};
}

}  // namespace omniserve
