// Host code of paged decode attention, split as FlashInfer's plan/run: the plan checks a page table
// and splits its sequences into (sequence, chunk) items once; each run (one per layer) attends over
// the plan's items in parallel and merges the chunks by their LSE.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/types.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "decode_kernel.h"
#include "host_ops.h"

namespace omniserve {
namespace {

constexpr int64_t kMinChunkTokens = 256;  // below this, merge overhead beats the extra parallelism
constexpr int64_t kItemsPerThread = 4;    // spare items so dynamic scheduling evens out ragged lengths
constexpr float kLn2 = 0.69314718055994530942f;

struct Kernel {
  DecodeChunkFn fn;
  bool reads_qf;  // false for the bf16 dot-product kernel, which reads q's own bits
};

Kernel pick_kernel(DType dtype, const std::string& backend) {
  TORCH_CHECK_VALUE(backend == "auto" || backend == "avx512" || backend == "avx512_bf16" || backend == "portable",
                    "backend must be one of auto, avx512_bf16, avx512, portable; got \"", backend, "\"");
  if (backend == "portable") return {decode_chunk_portable(dtype), true};
#if defined(__x86_64__)
  bool bf16_dot = false;
  DecodeChunkFn fn = decode_chunk_avx512(dtype, backend != "avx512", &bf16_dot);
  if (fn != nullptr) return {fn, !bf16_dot};
#endif
  TORCH_CHECK_VALUE(backend == "auto", "backend \"", backend, "\" needs AVX-512, which this CPU lacks");
  return {decode_chunk_portable(dtype), true};
}

// Per (sequence, query head): the LSE-weighted sum of the sequence's chunk outputs (items
// first_item[b] .. first_item[b + 1] - 1, each [H_q, D] with base-2 LSEs [H_q]) into out [B, H_q, D]
// fp32, and the natural-log LSE into lse [B, H_q].
void merge_chunks(const std::vector<int64_t>& first_item, int64_t batch, int hq, int D, const float* o_part,
                  const float* lse2_part, float* out, float* lse) {
  at::parallel_for(0, batch * hq, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row == b * H_q + h
      const int64_t b = row / hq, h = row % hq;
      const int64_t i0 = first_item[b], i1 = first_item[b + 1];
      float* o = out + row * D;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = i0; i < i1; ++i) mx = std::max(mx, lse2_part[i * hq + h]);
      for (int d = 0; d < D; ++d) o[d] = 0.f;
      if (mx == -std::numeric_limits<float>::infinity()) {  // empty sequence
        lse[row] = -std::numeric_limits<float>::infinity();
        continue;
      }
      float wsum = 0.f;
      for (int64_t i = i0; i < i1; ++i) {
        const float w = std::exp2(lse2_part[i * hq + h] - mx);
        wsum += w;
        const float* op = o_part + (i * hq + h) * D;
        for (int d = 0; d < D; ++d) o[d] += w * op[d];
      }
      const float inv = 1.f / wsum;
      for (int d = 0; d < D; ++d) o[d] *= inv;
      lse[row] = (mx + std::log2(wsum)) * kLn2;
    }
  });
}

}  // namespace

DecodePlan plan_paged_decode(const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices,
                             const torch::Tensor& kv_last_page_len, int64_t num_pages, int64_t page_size) {
  check_int32_vector(kv_indptr, "kv_indptr", -1);
  TORCH_CHECK_VALUE(kv_indptr.size(0) >= 1, "kv_indptr must have B + 1 entries, got none");
  const int64_t batch = kv_indptr.size(0) - 1;
  const std::vector<int64_t> seq_lens =
      check_paged_metadata(kv_indptr, kv_indices, kv_last_page_len, batch, num_pages, page_size);
  DecodePlan plan;
  plan.batch = batch;
  plan.num_pages = num_pages;
  plan.page_size = page_size;
  const int32_t* indptr = kv_indptr.data_ptr<int32_t>();
  plan.kv_indices.assign(kv_indices.data_ptr<int32_t>(), kv_indices.data_ptr<int32_t>() + indptr[batch]);

  // Split each sequence into chunks of about total / (threads * k) tokens, whole tiles.
  int64_t total = 0;
  for (int64_t len : seq_lens) total += len;
  const int64_t threads = at::get_num_threads();
  int64_t chunk = std::numeric_limits<int32_t>::max();
  if (threads > 1) {
    chunk = std::max(kMinChunkTokens, (total + threads * kItemsPerThread - 1) / (threads * kItemsPerThread));
    chunk = (chunk + kTokenTile - 1) / kTokenTile * kTokenTile;
  }
  plan.first_item.resize(batch + 1);
  plan.last_page.assign(batch, -1);
  plan.last_offset.assign(batch, 0);
  const int32_t* last = kv_last_page_len.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    if (seq_lens[b] > 0) {  // where the append of sequence b's newest token goes
      plan.last_page[b] = plan.kv_indices[indptr[b + 1] - 1];
      plan.last_offset[b] = last[b] - 1;
    }
    plan.first_item[b] = static_cast<int64_t>(plan.items.size());
    const int64_t len = seq_lens[b];
    for (int64_t t = 0; t < len; t += chunk)
      plan.items.push_back(
          {static_cast<int>(b), indptr[b], static_cast<int>(t), static_cast<int>(std::min(len, t + chunk))});
    plan.one_chunk_each &= plan.items.size() - plan.first_item[b] == 1;
  }
  plan.first_item[batch] = static_cast<int64_t>(plan.items.size());
  return plan;
}

std::tuple<torch::Tensor, torch::Tensor> run_paged_decode(
    const DecodePlan& plan, const torch::Tensor& q_in, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
    double sm_scale, const std::string& kv_layout, const std::string& backend,
    const std::optional<torch::Tensor>& out_opt, const std::optional<torch::Tensor>& lse_opt) {
  const Layout layout = parse_layout(kv_layout);
  const CacheShape c = check_caches(k_cache, v_cache, layout);
  check_cpu(q_in, "q");
  check_dim(q_in, 3, "q", "[B, H_q, D]");
  TORCH_CHECK_TYPE(q_in.scalar_type() == k_cache.scalar_type(), "q and the KV cache must have the same dtype, got ",
                   q_in.scalar_type(), " and ", k_cache.scalar_type());
  const int64_t batch = q_in.size(0), hq = q_in.size(1);
  TORCH_CHECK_VALUE(batch == plan.batch, "q has ", batch, " rows but the plan was made for ", plan.batch);
  TORCH_CHECK_VALUE(c.num_pages == plan.num_pages && c.page_size == plan.page_size, "the plan was made for a cache of ",
                    plan.num_pages, " pages of ", plan.page_size, " tokens, this one has ", c.num_pages, " of ",
                    c.page_size);
  TORCH_CHECK_VALUE(q_in.size(2) == c.head_dim, "q's head_dim (", q_in.size(2), ") must match the KV cache's (",
                    c.head_dim, ")");
  TORCH_CHECK_VALUE(hq > 0 && hq % c.num_kv_heads == 0, "H_q (", hq, ") must be a positive multiple of H_kv (",
                    c.num_kv_heads, ")");
  const int G = static_cast<int>(hq / c.num_kv_heads);
  TORCH_CHECK_VALUE(G <= kMaxGroupSize, "at most ", kMaxGroupSize, " query heads per KV head are supported, got ", G);
  TORCH_CHECK_VALUE(hq <= kMaxQoHeads, "at most ", kMaxQoHeads, " query heads are supported, got ", hq);
  TORCH_CHECK_VALUE(std::isfinite(sm_scale) && sm_scale > 0, "sm_scale must be a positive finite number, got ",
                    sm_scale);
  const DType dtype = dtype_of(q_in, "q");
  const Kernel kernel = pick_kernel(dtype, backend);
  const torch::Tensor q = q_in.contiguous();

  // Caller-owned outputs (FlashInfer's run(out=, lse=)) save an allocation and a copy per layer.
  torch::Tensor out = out_opt.has_value() ? *out_opt : torch::empty_like(q);
  torch::Tensor lse = lse_opt.has_value() ? *lse_opt : torch::empty({batch, hq}, q.options().dtype(torch::kFloat32));
  check_cpu(out, "out");
  check_cpu(lse, "lse");
  TORCH_CHECK_VALUE(out.sizes() == q.sizes() && out.is_contiguous(), "out must be a contiguous tensor of q's shape ",
                    q.sizes(), ", got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type(), "out must have q's dtype ", q.scalar_type(), ", got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == batch && lse.size(1) == hq && lse.is_contiguous(),
                    "lse must be a contiguous [B, H_q] = [", batch, ", ", hq, "] tensor, got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == torch::kFloat32, "lse must be float32, got ", lse.scalar_type());
  if (batch == 0) return {out, lse};

  // All kernels but the bf16 dot-product one read q in fp32, pre-scaled by sm_scale * log2(e) (scores
  // are kept in base 2).
  const float sm_scale_log2 = static_cast<float>(sm_scale * 1.44269504088896340736);
  const torch::Tensor qf =  // out of place: q may be the caller's fp32 tensor
      kernel.reads_qf ? q.to(torch::kFloat32) * sm_scale_log2 : torch::Tensor();
  DecodeParams prm;
  prm.kv = paged_kv_view(k_cache, v_cache, c, layout, plan.kv_indices.data());  // the plan's checked copy
  prm.q = q.data_ptr();
  prm.qf = kernel.reads_qf ? qf.data_ptr<float>() : nullptr;
  prm.num_qo_heads = static_cast<int>(hq);
  prm.num_kv_heads = static_cast<int>(c.num_kv_heads);
  prm.head_dim = static_cast<int>(c.head_dim);
  prm.sm_scale_log2 = sm_scale_log2;

  // With one chunk per sequence (short contexts) there is nothing to merge: the chunk outputs are
  // the result, written straight into an fp32 `out` or converted in one vectorized copy.
  const std::vector<DecodeChunk>& items = plan.items;
  const int64_t n_items = static_cast<int64_t>(items.size());
  const bool one_chunk_each = plan.one_chunk_each;
  const auto f32 = q.options().dtype(torch::kFloat32);
  const torch::Tensor o_part =
      one_chunk_each && dtype == DType::kFloat32 ? out : torch::empty({n_items, hq, c.head_dim}, f32);
  const torch::Tensor lse2_part = one_chunk_each ? lse : torch::empty({n_items, hq}, f32);
  const int D = prm.head_dim, H = prm.num_qo_heads;
  float* const o_ptr = o_part.data_ptr<float>();
  float* const lse2_ptr = lse2_part.data_ptr<float>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_items), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n_items; i = next++) kernel.fn(prm, items[i], o_ptr + i * H * D, lse2_ptr + i * H);
  });

  if (one_chunk_each) {
    for (int64_t i = 0; i < batch * hq; ++i) lse2_ptr[i] *= kLn2;  // lse2_part is lse: base 2 -> natural log
    if (dtype != DType::kFloat32) out.copy_(o_part.view_as(out));
  } else {
    const torch::Tensor merged = dtype == DType::kFloat32 ? out : torch::empty(out.sizes(), f32);
    merge_chunks(plan.first_item, batch, H, D, o_ptr, lse2_ptr, merged.data_ptr<float>(), lse.data_ptr<float>());
    if (dtype != DType::kFloat32) out.copy_(merged);
  }
  return {out, lse};
}

std::tuple<torch::Tensor, torch::Tensor> paged_decode_attention(
    const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
    const torch::Tensor& kv_indptr, const torch::Tensor& kv_indices, const torch::Tensor& kv_last_page_len,
    double sm_scale, const std::string& kv_layout, const std::string& backend,
    const std::optional<torch::Tensor>& out, const std::optional<torch::Tensor>& lse) {
  const CacheShape c = check_caches(k_cache, v_cache, parse_layout(kv_layout));
  check_cpu(q, "q");
  check_dim(q, 3, "q", "[B, H_q, D]");
  check_int32_vector(kv_indptr, "kv_indptr", q.size(0) + 1);
  const DecodePlan plan = plan_paged_decode(kv_indptr, kv_indices, kv_last_page_len, c.num_pages, c.page_size);
  return run_paged_decode(plan, q, k_cache, v_cache, sm_scale, kv_layout, backend, out, lse);
}

}  // namespace omniserve
