// AVX-512 decode-attention kernel body. Included twice by decode_avx512.cpp, each time inside a
// `#pragma GCC target` region and with OMNI_NS / OMNI_BF16_DOT set, so the bf16 dot-product
// variant (vdpbf16ps) is compiled apart from the plain AVX-512 one. Everything here has internal
// linkage except OMNI_NS::select(), so no AVX-512 code can be merged into portable callers.
//
// Per chunk, tokens are taken in tiles of 16 (one page at page size 16), and within a tile KV head
// by KV head, so a tile reads its pages' K and V rows whole. Per tile and KV head: scores of the G
// query heads of its GQA group against each K row (K read once per group; the 16 dot products of
// a head are summed across lanes together), an online-softmax update per head (exp2 polynomial,
// 16 lanes), then P·V with the G output rows held in registers, 8 heads at a time.

namespace omniserve {
namespace OMNI_NS {
namespace {

constexpr int kTile = kTokenTile;
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

// Lane t of the result = the sum of the 16 lanes of v[t]: three rounds of pairwise shuffles and
// adds (45 ops for 16 sums, against about 8 per sum for separate horizontal reductions).
__attribute__((always_inline)) inline __m512 sum_lanes16(const __m512* v) {
  __m512 w[8], z[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j)  // per 128-bit lane: the lane's partial sums of tokens 4j..4j+3
    z[j] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * j], w[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * j], w[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 p01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 p23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(p01, p23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(p01, p23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Rows of the next tile to prefetch, one K and one V row per token of the current tile, so the
// prefetches interleave with the arithmetic instead of filling the line-fill buffers in one burst.
struct Prefetch {
  const char* const* k;
  const char* const* v;
  int n;          // rows (0: none)
  int row_bytes;  // bytes per row, a multiple of 32

  template <int kRowBytes = 0>  // row_bytes when known at compile time: the loop unrolls
  inline void row(int t) const {
    for (int b = 0; b < (kRowBytes ? kRowBytes : row_bytes); b += 64) {
      _mm_prefetch(k[t] + b, _MM_HINT_T1);
      _mm_prefetch(v[t] + b, _MM_HINT_T1);
    }
  }
};

#if OMNI_BF16_DOT
// bf16 scores of GB heads for a head_dim FD known at compile time: the heads' q (FD / 32 vectors
// each) stay in registers for the whole tile and the loops unroll. With D a runtime value, q was
// reloaded for every token and the loop overhead outweighed the dot products.
template <int GB, int FD>
inline void scores_bf16_fixed(const uint16_t* qh, const char* const* krow, int n, const Prefetch& pf,
                              __m512 (*part)[kTile]) {
  constexpr int C = FD / 32;
  __m512bh qv[GB][C];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = (__m512bh)_mm512_loadu_si512(qh + g * FD + 32 * c);
  for (int t = 0; t < n; ++t) {
    if (t < pf.n) pf.row<2 * FD>(t);
    __m512bh kv[C];
    for (int c = 0; c < C; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(krow[t] + 64 * c);
    for (int g = 0; g < GB; ++g) {
      __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[g][0], kv[0]);
      for (int c = 1; c < C; ++c) acc = _mm512_dpbf16_ps(acc, qv[g][c], kv[c]);
      part[g][t] = acc;
    }
  }
}
#endif

// Runs scores_bf16_fixed when D is 64 or 128 and the GB heads' q fit in 16 registers; false if not.
template <DType DT, int GB>
inline bool scores_fixed_d(const uint16_t* qh, const char* const* krow, int n, int D, const Prefetch& pf,
                           __m512 (*part)[kTile]) {
#if OMNI_BF16_DOT
  if constexpr (DT == DType::kBFloat16) {
    if constexpr (GB * 2 <= 16) {
      if (D == 64) {
        scores_bf16_fixed<GB, 64>(qh, krow, n, pf, part);
        return true;
      }
    }
    if constexpr (GB * 4 <= 16) {
      if (D == 128) {
        scores_bf16_fixed<GB, 128>(qh, krow, n, pf, part);
        return true;
      }
    }
  }
#endif
  (void)qh, (void)krow, (void)n, (void)D, (void)pf, (void)part;
  return false;
}

// Scores s[g][t] = q_g . k_t * sm_scale * log2(e) of GB heads (a compile-time count, so the
// accumulators stay in registers) over one tile of n tokens. qf holds the heads' q in fp32,
// already scaled (null for the bf16 dot kernel, which never reads it); qh holds q's own bf16 bits
// for vdpbf16ps, scaled after the dot product so q is not rounded twice. part[g][t] holds each
// dot product's 16 lane partials until the tile's sums.
template <DType DT, int GB>
inline void scores_block(const float* qf, const uint16_t* qh, float scale, const char* const* krow, int n,
                         int D, const Prefetch& pf, __m512 (*part)[kTile], float (*s)[kTile]) {
  const bool fixed = scores_fixed_d<DT, GB>(qh, krow, n, D, pf, part);
  for (int t = 0; t < (fixed ? 0 : n); ++t) {
    if (t < pf.n) pf.row(t);
    const char* kt = krow[t];
    __m512 acc[GB];
    for (int g = 0; g < GB; ++g) acc[g] = _mm512_setzero_ps();
#if OMNI_BF16_DOT
    if constexpr (DT == DType::kBFloat16) {
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
      for (int d = 0; d < D; d += 16) {
        const __m512 kv = load16<DT>(kt + elem_bytes<DT>() * d);
        for (int g = 0; g < GB; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + d), kv, acc[g]);
      }
    }
    for (int g = 0; g < GB; ++g) part[g][t] = acc[g];
  }
  const bool bf16_dot = OMNI_BF16_DOT && DT == DType::kBFloat16;
  const __m512 dot_scale = _mm512_set1_ps(bf16_dot ? scale : 1.f);
  for (int g = 0; g < GB; ++g) _mm512_store_ps(s[g], _mm512_mul_ps(sum_lanes16(part[g]), dot_scale));
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
    if constexpr (DT == DType::kBFloat16 && DB % 2 == 0) {
      // 32 bf16 -> 2 x 16 fp32 in two ops: the even elements shifted up, the odd ones masked. The
      // accumulators hold them in that split order (see split_bf16_order).
      for (int j = 0; j < DB; j += 2) {
        const __m512i x = _mm512_loadu_si512(vrow[t] + 2 * (d0 + 16 * j));
        vv[j] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        vv[j + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xFFFF0000u))));
      }
    } else {
      for (int j = 0; j < DB; ++j) vv[j] = load16<DT>(vrow[t] + elem_bytes<DT>() * (d0 + 16 * j));
    }
    for (int g = 0; g < GB; ++g) {
      const __m512 pg = _mm512_set1_ps(p[g][t]);
      for (int j = 0; j < DB; ++j) acc[g][j] = _mm512_fmadd_ps(pg, vv[j], acc[g][j]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < DB; ++j) _mm512_storeu_ps(o + g * D + d0 + 16 * j, acc[g][j]);
}

// bf16 outputs are accumulated with each group of 32 columns in split order (16 even columns, then
// 16 odd ones); 32-column groups start at multiples of 32 and a 16-column tail stays in order.
// Interleaves o [rows, D] back into column order.
inline void split_bf16_order_to_columns(float* o, int rows, int D) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int r = 0; r < rows; ++r)
    for (int d = 0; d + 32 <= D; d += 32) {
      float* x = o + (int64_t)r * D + d;
      const __m512 even = _mm512_loadu_ps(x), odd = _mm512_loadu_ps(x + 16);
      _mm512_storeu_ps(x, _mm512_permutex2var_ps(even, lo, odd));
      _mm512_storeu_ps(x + 16, _mm512_permutex2var_ps(even, hi, odd));
    }
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
                        int D, const Prefetch& pf, __m512 (*part)[kTile], float (*s)[kTile]) {
  const Prefetch none{nullptr, nullptr, 0, 0};
  for (int g0 = 0; g0 < G; g0 += kHeadBlock) {
#define OMNI_CALL(GB) \
  scores_block<DT, GB>(qf ? qf + g0 * D : qf, qh + g0 * D, scale, krow, n, D, g0 == 0 ? pf : none, part, s + g0)
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
  const int D = prm.head_dim, Hq = prm.num_qo_heads, Hkv = prm.num_kv_heads;
  const int G = Hq / Hkv;
  constexpr int eb = elem_bytes<DT>();
  const float* qf = prm.qf ? prm.qf + (int64_t)c.b * Hq * D : nullptr;  // null for the bf16 dot kernel
  const uint16_t* qh = static_cast<const uint16_t*>(prm.q) + (int64_t)c.b * Hq * D;  // read by vdpbf16ps only
  const char* kbase = static_cast<const char*>(prm.kv.k);
  const char* vbase = static_cast<const char*>(prm.kv.v);

  alignas(64) __m512 part[kHeadBlock][kTile];
  alignas(64) float s[kMaxGroupSize][kTile];
  alignas(64) float m[kMaxQoHeads], l[kMaxQoHeads], alpha[kMaxGroupSize];
  for (int g = 0; g < kHeadBlock; ++g)
    for (int t = 0; t < kTile; ++t) part[g][t] = _mm512_setzero_ps();  // lanes of a short tile's absent rows
  for (int h = 0; h < Hq; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
  }
  for (int i = 0; i < Hq * D; i += 16) _mm512_storeu_ps(o + i, _mm512_setzero_ps());

  // Byte offsets of the tile's token rows (head 0) and of the next tile's, which are prefetched head
  // by head while this tile is computed: pages are scattered, which no hardware prefetcher follows.
  int64_t off[2][kTile];
  const int ps = prm.kv.page_size;
  const int row_bytes = D * eb;
  const int64_t head_bytes = prm.kv.head_stride * eb;
  auto rows = [&](int t0, int64_t* dst) {
    const int n = c.tok_end - t0 < kTile ? c.tok_end - t0 : kTile;
    for (int t = 0; t < n; ++t) {
      const int tok = t0 + t;
      const int64_t page = prm.kv.kv_indices[c.page_offset + tok / ps];
      dst[t] = (page * prm.kv.page_stride + (tok % ps) * prm.kv.token_stride) * eb;
    }
    return n;
  };
  int cur = 0;
  int n_next = c.tok_begin < c.tok_end ? rows(c.tok_begin, off[0]) : 0;
  for (int t0 = c.tok_begin; t0 < c.tok_end; t0 += kTile, cur ^= 1) {
    const int n = n_next;
    n_next = t0 + kTile < c.tok_end ? rows(t0 + kTile, off[cur ^ 1]) : 0;
    const __mmask16 valid = (__mmask16)((1u << n) - 1);
    for (int h = 0; h < Hkv; ++h) {
      const char *krow[kTile], *vrow[kTile], *kpf[kTile], *vpf[kTile];
      for (int t = 0; t < n; ++t) {
        krow[t] = kbase + off[cur][t] + h * head_bytes;
        vrow[t] = vbase + off[cur][t] + h * head_bytes;
      }
      for (int t = 0; t < n_next; ++t) {
        kpf[t] = kbase + off[cur ^ 1][t] + h * head_bytes;
        vpf[t] = vbase + off[cur ^ 1][t] + h * head_bytes;
      }
      const Prefetch pf{kpf, vpf, n_next < n ? n_next : n, row_bytes};
      const int q0 = h * G;  // the group's first query head
      tile_scores<DT>(qf ? qf + q0 * D : qf, qh + q0 * D, prm.sm_scale_log2, krow, n, G, D, pf, part, s);
      for (int g = 0; g < G; ++g) {
        float& mg = m[q0 + g];
        const __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), valid, s[g]);
        const float m_new = std::max(mg, _mm512_reduce_max_ps(sv));
        alpha[g] = mg == -INFINITY ? 0.f : exp2f(mg - m_new);
        const __m512 pv = _mm512_maskz_mov_ps(valid, exp2_neg(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
        _mm512_store_ps(s[g], pv);  // s now holds p
        l[q0 + g] = l[q0 + g] * alpha[g] + _mm512_reduce_add_ps(pv);
        mg = m_new;
      }
      tile_pv<DT>(vrow, n, G, D, alpha, s, o + q0 * D);
    }
  }

  if constexpr (DT == DType::kBFloat16) split_bf16_order_to_columns(o, Hq, D);
  for (int h = 0; h < Hq; ++h) {
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    for (int d = 0; d < D; d += 16)
      _mm512_storeu_ps(o + h * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + h * D + d), _mm512_set1_ps(inv)));
    lse2[h] = l[h] > 0.f ? m[h] + log2f(l[h]) : -INFINITY;
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
