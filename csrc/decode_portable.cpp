// Portable decode-attention kernel: plain C++ with fp32 accumulation and a per-token online softmax.
// The run-time fallback on CPUs without AVX-512 (and on non-x86 machines).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

#include "decode_kernel.h"

namespace omniserve {
namespace {

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
void decode_chunk(const DecodeParams& p, const DecodeChunk& c, float* o, float* lse2) {
  const int D = p.head_dim;
  const int G = p.num_qo_heads / p.num_kv_heads;
  const T* q = static_cast<const T*>(p.q) + ((int64_t)c.b * p.num_qo_heads + (int64_t)c.kv_head * G) * D;
  const T* kbase = static_cast<const T*>(p.kv.k) + c.kv_head * p.kv.head_stride;
  const T* vbase = static_cast<const T*>(p.kv.v) + c.kv_head * p.kv.head_stride;

  float qf[kMaxGroupSize * kMaxHeadDim];
  float m[kMaxGroupSize], l[kMaxGroupSize];
  for (int g = 0; g < G; ++g) {
    for (int d = 0; d < D; ++d) qf[g * D + d] = to_float(q[g * D + d]) * p.sm_scale_log2;
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
  }
  for (int i = 0; i < G * D; ++i) o[i] = 0.f;

  for (int t = c.tok_begin; t < c.tok_end; ++t) {
    const int64_t page = p.kv.kv_indices[c.page_offset + t / p.kv.page_size];
    const int64_t off = page * p.kv.page_stride + (t % p.kv.page_size) * p.kv.token_stride;
    const T* kt = kbase + off;
    const T* vt = vbase + off;
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += qf[g * D + d] * to_float(kt[d]);
      const float m_new = std::max(m[g], s);
      const float alpha = std::exp2(m[g] - m_new);  // 0 on the first token (m = -inf)
      const float pr = std::exp2(s - m_new);
      l[g] = l[g] * alpha + pr;
      m[g] = m_new;
      float* og = o + g * D;
      for (int d = 0; d < D; ++d) og[d] = og[d] * alpha + pr * to_float(vt[d]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int d = 0; d < D; ++d) o[g * D + d] *= inv;
    lse2[g] = l[g] > 0.f ? m[g] + std::log2(l[g]) : -std::numeric_limits<float>::infinity();
  }
}

}  // namespace

DecodeChunkFn decode_chunk_portable(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return &decode_chunk<float>;
    case DType::kFloat16: return &decode_chunk<c10::Half>;
    case DType::kBFloat16: return &decode_chunk<c10::BFloat16>;
  }
  return nullptr;
}

}  // namespace omniserve
