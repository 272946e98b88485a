// Argument checks shared by the host entry points. Each raises a Python exception (ValueError,
// TypeError or IndexError through c10) whose message names the argument and what to fix.
#pragma once

#include <torch/types.h>

#include <string>

#include "decode_kernel.h"

namespace omniserve {

inline DType dtype_of(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return DType::kFloat32;
    case torch::kFloat16: return DType::kFloat16;
    case torch::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be bfloat16, float16 or float32, got ", t.scalar_type());
  }
}

inline void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor (BE KV lives in host memory), got ",
                    t.device());
}

inline void check_dim(const torch::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_int32_vector(const torch::Tensor& t, const char* name, int64_t len) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == torch::kInt32, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor, got shape ",
                    t.sizes());
  if (len >= 0) TORCH_CHECK_VALUE(t.size(0) == len, name, " must have ", len, " entries, got ", t.size(0));
}

enum class Layout { kNHD, kHND };

inline Layout parse_layout(const std::string& s) {
  TORCH_CHECK_VALUE(s == "NHD" || s == "HND", "kv_layout must be \"NHD\" or \"HND\", got \"", s, "\"");
  return s == "NHD" ? Layout::kNHD : Layout::kHND;
}

// Paged K/V caches: NHD [num_pages, page_size, H_kv, D], HND [num_pages, H_kv, page_size, D].
struct CacheShape {
  int64_t num_pages, page_size, num_kv_heads, head_dim;
};

inline CacheShape check_caches(const torch::Tensor& k_cache, const torch::Tensor& v_cache, Layout layout) {
  const char* shape = layout == Layout::kNHD ? "[num_pages, page_size, H_kv, D] (NHD)"
                                              : "[num_pages, H_kv, page_size, D] (HND)";
  check_cpu(k_cache, "k_cache");
  check_cpu(v_cache, "v_cache");
  check_dim(k_cache, 4, "k_cache", shape);
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape, got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK_TYPE(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must have the same dtype, got ",
                   k_cache.scalar_type(), " and ", v_cache.scalar_type());
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous");
  dtype_of(k_cache, "k_cache");
  CacheShape c;
  c.num_pages = k_cache.size(0);
  c.page_size = layout == Layout::kNHD ? k_cache.size(1) : k_cache.size(2);
  c.num_kv_heads = layout == Layout::kNHD ? k_cache.size(2) : k_cache.size(1);
  c.head_dim = k_cache.size(3);
  TORCH_CHECK_VALUE(c.head_dim % 16 == 0 && c.head_dim > 0 && c.head_dim <= kMaxHeadDim,
                    "head_dim must be a positive multiple of 16 up to ", kMaxHeadDim, ", got ", c.head_dim);
  TORCH_CHECK_VALUE(c.page_size > 0 && c.num_kv_heads > 0, "k_cache has an empty page or head dimension: ",
                    k_cache.sizes());
  return c;
}

inline PagedKV paged_kv_view(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const CacheShape& c,
                             Layout layout, const int32_t* kv_indices) {
  PagedKV kv;
  kv.k = k_cache.data_ptr();
  kv.v = v_cache.data_ptr();
  kv.page_stride = c.page_size * c.num_kv_heads * c.head_dim;
  kv.token_stride = layout == Layout::kNHD ? c.num_kv_heads * c.head_dim : c.head_dim;
  kv.head_stride = layout == Layout::kNHD ? c.head_dim : c.page_size * c.head_dim;
  kv.page_size = static_cast<int>(c.page_size);
  kv.kv_indices = kv_indices;
  return kv;
}

// Checks kv_indptr / kv_indices / kv_last_page_len (FlashInfer's paged-KV metadata) and returns
// each sequence's length in tokens. A sequence with no pages has length 0 and last_page_len 0.
std::vector<int64_t> check_paged_metadata(const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices,
                                          const torch::Tensor& kv_last_page_len, int64_t batch,
                                          int64_t num_pages, int64_t page_size);

}  // namespace omniserve
