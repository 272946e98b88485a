// AVX-512 decode-attention kernel body. Included twice by decode_avx512.cpp, each time inside a
// `#pragma GCC target` region and with OMNI_NS / OMNI_BF16_DOT set, so the bf16 dot-product
// variant (vdpbf16ps) is compiled apart from the plain AVX-512 one. Everything here has internal
// linkage except OMNI_NS::select(), so no AVX-512 code can be merged into portable callers.
//
// Per chunk, tokens are taken in tiles of 16. For each tile: scores of all G query heads against
// each K row (K read once per GQA group), an online-softmax update per head (exp2 polynomial,
// 16 lanes), then P·V with the G output rows held in registers, 8 heads at a time.

namespace omniserve {
namespace OMNI_NS {
namespace {

constexpr int kTile = 16;
constexpr int kHeadBlock = 8;

// 16 elements -> 16 fp32 lanes.
template <DType DT>
inline __m512 load16(const void* p);
template <>
inline __m512 load16<DType::kFloat32>(const void* p) {
  return _mm512_loadu_ps(p);
}
template <>
inline __m512 load16<DType::kFloat16>(const void* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}
template <>
inline __m512 load16<DType::kBFloat16>(const void* p) {
  // bf16 is the top half of an fp32: widen and shift.
  const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}

template <DType DT>
constexpr int elem_bytes() {
  return DT == DType::kFloat32 ? 4 : 2;
}

// 2^x for x <= 0, relative error ~1.5e-7: x = n + f with n = round(x), f in [-0.5, 0.5],
// 2^f by a degree-5 polynomial (least-squares fit on Chebyshev nodes), scaled by 2^n.
inline __m512 exp2_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 y = _mm512_set1_ps(1.3266970636323094e-3f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.675459936261177e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.550742521882057e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022121727466583e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931469440460205e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(y, n);
}

// Scores s[g][t] = q_g . k_t * sm_scale * log2(e) of GB heads (a compile-time count, so the
// accumulators stay in registers) over one tile of n tokens. qf holds the heads' q in fp32,
// already scaled; qh holds q's own bf16 bits for vdpbf16ps, scaled after the dot product so q is
// not rounded twice.
template <DType DT, int GB>
inline void scores_block(const float* qf, const uint16_t* qh, float scale, const char* const* krow, int n,
                         int D, float (*s)[kTile]) {
  for (int t = 0; t < n; ++t) {
    const char* kt = krow[t];
    __m512 acc[GB];
    for (int g = 0; g < GB; ++g) acc[g] = _mm512_setzero_ps();
    float dot_scale = 1.f;
#if OMNI_BF16_DOT
    if constexpr (DT == DType::kBFloat16) {
      dot_scale = scale;
      int d = 0;
      for (; d + 32 <= D; d += 32) {
        const __m512bh kv = (__m512bh)_mm512_loadu_si512(kt + 2 * d);
        for (int g = 0; g < GB; ++g)
          acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_loadu_si512(qh + g * D + d), kv);
      }
      if (d < D) {  // a 16-wide tail (D is a multiple of 16)
        const __m256bh kv = (__m256bh)_mm256_loadu_si256((const __m256i*)(kt + 2 * d));
        for (int g = 0; g < GB; ++g) {
          const __m256bh qv = (__m256bh)_mm256_loadu_si256((const __m256i*)(qh + g * D + d));
          acc[g] = _mm512_add_ps(acc[g], _mm512_zextps256_ps512(_mm256_dpbf16_ps(_mm256_setzero_ps(), qv, kv)));
        }
      }
    } else
#endif
    {
      (void)qh;
      (void)scale;
      for (int d = 0; d < D; d += 16) {
        const __m512 kv = load16<DT>(kt + elem_bytes<DT>() * d);
        for (int g = 0; g < GB; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + d), kv, acc[g]);
      }
    }
    for (int g = 0; g < GB; ++g) s[g][t] = _mm512_reduce_add_ps(acc[g]) * dot_scale;
  }
}

// o[g][d0 : d0 + 16 * DB] = o[g] * alpha[g] + sum_t p[g][t] * v_t for GB heads: GB * DB independent
// accumulator chains, enough to hide the FMA latency.
template <DType DT, int GB, int DB>
inline void pv_pass(const char* const* vrow, int n, int D, int d0, const float* alpha, const float (*p)[kTile],
                    float* o) {
  __m512 acc[GB][DB];
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < DB; ++j)
      acc[g][j] = _mm512_mul_ps(_mm512_loadu_ps(o + g * D + d0 + 16 * j), _mm512_set1_ps(alpha[g]));
  for (int t = 0; t < n; ++t) {
    __m512 vv[DB];
    for (int j = 0; j < DB; ++j) vv[j] = load16<DT>(vrow[t] + elem_bytes<DT>() * (d0 + 16 * j));
    for (int g = 0; g < GB; ++g) {
      const __m512 pg = _mm512_set1_ps(p[g][t]);
      for (int j = 0; j < DB; ++j) acc[g][j] = _mm512_fmadd_ps(pg, vv[j], acc[g][j]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < DB; ++j) _mm512_storeu_ps(o + g * D + d0 + 16 * j, acc[g][j]);
}

template <DType DT, int GB>
inline void pv_block(const char* const* vrow, int n, int D, const float* alpha, const float (*p)[kTile],
                     float* o) {
  // Up to 4 column blocks per pass, at most 16 accumulators.
  constexpr int DB = GB >= 8 ? 2 : (GB >= 4 ? 4 : 4);
  int d = 0;
  for (; d + 16 * DB <= D; d += 16 * DB) pv_pass<DT, GB, DB>(vrow, n, D, d, alpha, p, o);
  if constexpr (DB > 2)
    for (; d + 32 <= D; d += 32) pv_pass<DT, GB, 2>(vrow, n, D, d, alpha, p, o);
  for (; d < D; d += 16) pv_pass<DT, GB, 1>(vrow, n, D, d, alpha, p, o);
}

#define OMNI_HEAD_BLOCK_SWITCH(gb, CALL) \
  switch (gb) {                          \
    case 1: CALL(1); break;              \
    case 2: CALL(2); break;              \
    case 3: CALL(3); break;              \
    case 4: CALL(4); break;              \
    case 5: CALL(5); break;              \
    case 6: CALL(6); break;              \
    case 7: CALL(7); break;              \
    default: CALL(8); break;             \
  }

template <DType DT>
inline void tile_scores(const float* qf, const uint16_t* qh, float scale, const char* const* krow, int n, int G,
                        int D, float (*s)[kTile]) {
  for (int g0 = 0; g0 < G; g0 += kHeadBlock) {
#define OMNI_CALL(GB) scores_block<DT, GB>(qf + g0 * D, qh + g0 * D, scale, krow, n, D, s + g0)
    OMNI_HEAD_BLOCK_SWITCH(G - g0, OMNI_CALL)
#undef OMNI_CALL
  }
}

template <DType DT>
inline void tile_pv(const char* const* vrow, int n, int G, int D, const float* alpha, const float (*p)[kTile],
                    float* o) {
  for (int g0 = 0; g0 < G; g0 += kHeadBlock) {
#define OMNI_CALL(GB) pv_block<DT, GB>(vrow, n, D, alpha + g0, p + g0, o + g0 * D)
    OMNI_HEAD_BLOCK_SWITCH(G - g0, OMNI_CALL)
#undef OMNI_CALL
  }
}
#undef OMNI_HEAD_BLOCK_SWITCH

template <DType DT>
void decode_chunk(const DecodeParams& prm, const DecodeChunk& c, float* o, float* lse2) {
  const int D = prm.head_dim;
  const int G = prm.num_qo_heads / prm.num_kv_heads;
  constexpr int eb = elem_bytes<DT>();
  const char* q = static_cast<const char*>(prm.q) +
                  ((int64_t)c.b * prm.num_qo_heads + (int64_t)c.kv_head * G) * D * eb;
  const char* kbase = static_cast<const char*>(prm.kv.k) + c.kv_head * prm.kv.head_stride * eb;
  const char* vbase = static_cast<const char*>(prm.kv.v) + c.kv_head * prm.kv.head_stride * eb;

  alignas(64) float qf[kMaxGroupSize * kMaxHeadDim];
  alignas(64) uint16_t qh[kMaxGroupSize * kMaxHeadDim];
  alignas(64) float s[kMaxGroupSize][kTile];
  alignas(64) float m[kMaxGroupSize], l[kMaxGroupSize], alpha[kMaxGroupSize];
  const __m512 scale = _mm512_set1_ps(prm.sm_scale_log2);
  for (int i = 0; i < G * D; i += 16) {
    _mm512_storeu_ps(qf + i, _mm512_mul_ps(load16<DT>(q + eb * i), scale));
    if constexpr (DT == DType::kBFloat16)
      _mm256_store_si256((__m256i*)(qh + i), _mm256_loadu_si256((const __m256i*)(q + eb * i)));
  }
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  for (int i = 0; i < G * D; i += 16) _mm512_storeu_ps(o + i, _mm512_setzero_ps());

  // Row pointers of the current tile and the next one; the next tile's rows are prefetched while
  // this one is computed (pages are scattered and NHD rows of one head are H_kv * D apart, which
  // the hardware prefetcher does not follow).
  const char* krow[2][kTile];
  const char* vrow[2][kTile];
  const int ps = prm.kv.page_size;
  const int row_bytes = D * eb;
  auto gather = [&](int t0, const char** kr, const char** vr) {
    const int n = c.tok_end - t0 < kTile ? c.tok_end - t0 : kTile;
    for (int t = 0; t < n; ++t) {
      const int tok = t0 + t;
      const int64_t page = prm.kv.kv_indices[c.page_offset + tok / ps];
      const int64_t off = (page * prm.kv.page_stride + (tok % ps) * prm.kv.token_stride) * eb;
      kr[t] = kbase + off;
      vr[t] = vbase + off;
    }
    return n;
  };
  int cur = 0;
  int n_next = c.tok_begin < c.tok_end ? gather(c.tok_begin, krow[0], vrow[0]) : 0;
  for (int t0 = c.tok_begin; t0 < c.tok_end; t0 += kTile, cur ^= 1) {
    const int n = n_next;
    n_next = t0 + kTile < c.tok_end ? gather(t0 + kTile, krow[cur ^ 1], vrow[cur ^ 1]) : 0;
    for (int t = 0; t < n_next; ++t) {
      for (int b = 0; b < row_bytes; b += 64) {
        _mm_prefetch(krow[cur ^ 1][t] + b, _MM_HINT_T0);
        _mm_prefetch(vrow[cur ^ 1][t] + b, _MM_HINT_T0);
      }
    }
    tile_scores<DT>(qf, qh, prm.sm_scale_log2, krow[cur], n, G, D, s);

    const __mmask16 valid = (__mmask16)((1u << n) - 1);
    for (int g = 0; g < G; ++g) {
      const __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), valid, s[g]);
      const float m_new = std::max(m[g], _mm512_reduce_max_ps(sv));
      alpha[g] = m[g] == -INFINITY ? 0.f : exp2f(m[g] - m_new);
      const __m512 pv = _mm512_maskz_mov_ps(valid, exp2_neg(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
      _mm512_store_ps(s[g], pv);  // s now holds p
      l[g] = l[g] * alpha[g] + _mm512_reduce_add_ps(pv);
      m[g] = m_new;
    }
    tile_pv<DT>(vrow[cur], n, G, D, alpha, s, o);
  }

  for (int g = 0; g < G; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int d = 0; d < D; d += 16)
      _mm512_storeu_ps(o + g * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + g * D + d), _mm512_set1_ps(inv)));
    lse2[g] = l[g] > 0.f ? m[g] + log2f(l[g]) : -INFINITY;
  }
}

}  // namespace

DecodeChunkFn select(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return &decode_chunk<DType::kFloat32>;
    case DType::kFloat16: return &decode_chunk<DType::kFloat16>;
    case DType::kBFloat16: return &decode_chunk<DType::kBFloat16>;
  }
  return nullptr;
}

}  // namespace OMNI_NS
}  // namespace omniserve
