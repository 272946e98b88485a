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
  const int D = p.head_dim, Hq = p.num_qo_heads;
  const int G = Hq / p.num_kv_heads;
  const float* qf = p.qf + (int64_t)c.b * Hq * D;
  const T* kbase = static_cast<const T*>(p.kv.k);
  const T* vbase = static_cast<const T*>(p.kv.v);

  float m[kMaxQoHeads], l[kMaxQoHeads];
  for (int h = 0; h < Hq; ++h) {
    m[h] = -std::numeric_limits<float>::infinity();
    l[h] = 0.f;
  }
  for (int i = 0; i < Hq * D; ++i) o[i] = 0.f;

  for (int t = c.tok_begin; t < c.tok_end; ++t) {
    const int64_t page = p.kv.kv_indices[c.page_offset + t / p.kv.page_size];
    const int64_t off = page * p.kv.page_stride + (t % p.kv.page_size) * p.kv.token_stride;
    for (int h = 0; h < Hq; ++h) {
      const int64_t head = (h / G) * p.kv.head_stride;
      const T* kt = kbase + off + head;
      const T* vt = vbase + off + head;
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += qf[h * D + d] * to_float(kt[d]);
      const float m_new = std::max(m[h], s);
      const float alpha = std::exp2(m[h] - m_new);  // 0 on the first token (m = -inf)
      const float pr = std::exp2(s - m_new);
      l[h] = l[h] * alpha + pr;
      m[h] = m_new;
      float* oh = o + h * D;
      for (int d = 0; d < D; ++d) oh[d] = oh[d] * alpha + pr * to_float(vt[d]);
    }
  }
  for (int h = 0; h < Hq; ++h) {
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    for (int d = 0; d < D; ++d) o[h * D + d] *= inv;
    lse2[h] = l[h] > 0.f ? m[h] + std::log2(l[h]) : -std::numeric_limits<float>::infinity();
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
