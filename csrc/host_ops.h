// Host entry points of the extension's ops (definitions in decode_attention.cpp and
// paged_kv_ops.cpp), shared by the op registrations in ops.cpp and the worker's doorbell loop.
#pragma once

#include <torch/types.h>

#include <optional>
#include <string>
#include <tuple>

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

}  // namespace omniserve
