// Host entry points of the extension's ops (definitions in decode_attention.cpp and
// paged_kv_ops.cpp), shared by the op registrations in ops.cpp and the worker's doorbell loop.
#pragma once

#include <torch/types.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "decode_kernel.h"

namespace omniserve {

// A checked page table and its split-KV work (FlashInfer's plan): made once per set of rows,
// run once per layer. It owns a copy of the page ids it checked, so a run reads no index that was
// not checked, whatever happens to the caller's tensors afterwards.
struct DecodePlan {
  int64_t batch = 0, num_pages = 0, page_size = 0;  // rows, and the cache geometry it was checked against
  std::vector<int32_t> kv_indices;
  std::vector<DecodeChunk> items;      // (sequence, token range) work items, in sequence order
  std::vector<int64_t> first_item;     // [batch + 1]: sequence b's items are first_item[b] .. first_item[b+1]-1
  bool one_chunk_each = true;          // nothing to merge
  std::vector<int32_t> last_page;      // [batch]: page id of each sequence's newest token, -1 when empty
  std::vector<int32_t> last_offset;    // [batch]: its offset in that page
};

DecodePlan plan_paged_decode(const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices,
                             const torch::Tensor& kv_last_page_len, int64_t num_pages, int64_t page_size);

std::tuple<torch::Tensor, torch::Tensor> run_paged_decode(
    const DecodePlan& plan, const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
    double sm_scale, const std::string& kv_layout, const std::string& backend,
    const std::optional<torch::Tensor>& out, const std::optional<torch::Tensor>& lse);

std::tuple<torch::Tensor, torch::Tensor> paged_decode_attention(
    const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
    const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices, const torch::Tensor& kv_last_page_len,
    double sm_scale, const std::string& kv_layout, const std::string& backend,
    const std::optional<torch::Tensor>& out, const std::optional<torch::Tensor>& lse);

void append_paged_kv(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices,
                     const torch::Tensor& kv_last_page_len, const std::string& kv_layout);

// The append of a planned page table: checks shapes only, writes at the plan's checked slots.
void run_append_paged_kv(const DecodePlan& plan, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& k_cache, const torch::Tensor& v_cache, const std::string& kv_layout);

std::tuple<torch::Tensor, torch::Tensor> merge_state(const torch::Tensor& v_a, const torch::Tensor& s_a,
                                                     const torch::Tensor& v_b, const torch::Tensor& s_b);

}  // namespace omniserve
