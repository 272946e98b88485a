#include "checks.h"

namespace omniserve {

std::vector<int64_t> check_paged_metadata(const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices,
                                          const torch::Tensor& kv_last_page_len, int64_t batch,
                                          int64_t num_pages, int64_t page_size) {
  check_int32_vector(kv_indptr, "kv_indptr", batch + 1);
  check_int32_vector(kv_indices, "kv_indices", -1);
  check_int32_vector(kv_last_page_len, "kv_last_page_len", batch);
  const int32_t* indptr = kv_indptr.data_ptr<int32_t>();
  const int32_t* indices = kv_indices.data_ptr<int32_t>();
  const int32_t* last = kv_last_page_len.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(indptr[0] == 0, "kv_indptr[0] must be 0, got ", indptr[0]);
  TORCH_CHECK_VALUE(indptr[batch] <= kv_indices.size(0), "kv_indptr[-1] = ", indptr[batch],
                    " exceeds the length of kv_indices (", kv_indices.size(0), ")");
  std::vector<int64_t> seq_lens(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t pages = static_cast<int64_t>(indptr[b + 1]) - indptr[b];
    TORCH_CHECK_VALUE(pages >= 0, "kv_indptr must be non-decreasing, but kv_indptr[", b + 1, "] = ", indptr[b + 1],
                      " < kv_indptr[", b, "] = ", indptr[b]);
    if (pages == 0) {
      TORCH_CHECK_VALUE(last[b] == 0, "kv_last_page_len[", b, "] must be 0 for a sequence with no pages, got ",
                        last[b]);
    } else {
      TORCH_CHECK_VALUE(last[b] >= 1 && last[b] <= page_size, "kv_last_page_len[", b, "] must be in 1..",
                        page_size, " (the page size), got ", last[b]);
    }
    seq_lens[b] = pages == 0 ? 0 : (pages - 1) * page_size + last[b];
  }
  for (int64_t i = 0; i < indptr[batch]; ++i) {
    TORCH_CHECK_INDEX(indices[i] >= 0 && indices[i] < num_pages, "kv_indices[", i, "] = ", indices[i],
                      " is outside the cache's ", num_pages, " pages");
  }
  return seq_lens;
}

}  // namespace omniserve
