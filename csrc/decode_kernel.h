// Interface between the host code of paged decode attention and its per-ISA kernels.
//
// The host splits each sequence into chunks of tokens ("split-KV", as flash decoding does); a kernel
// computes one chunk for all heads and writes a normalized partial output per query head with its
// base-2 log-sum-exp, which the host merges. A chunk covers every KV head, so it reads whole pages
// (NHD rows of all heads lie together) instead of one head's slice of each row.
#pragma once

#include <cstdint>

namespace omniserve {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Paged K/V of one layer. Strides are in elements. NHD: token_stride = H_kv * D, head_stride = D;
// HND: token_stride = D, head_stride = page_size * D.
struct PagedKV {
  const void* k;
  const void* v;
  int64_t page_stride;
  int64_t token_stride;
  int64_t head_stride;
  int page_size;
  const int32_t* kv_indices;
};

struct DecodeParams {
  PagedKV kv;
  const void* q;       // [B, H_q, D], contiguous, the caller's dtype
  const float* qf;     // [B, H_q, D] fp32, q * sm_scale_log2; null for the bf16 dot-product kernel
  int num_qo_heads;    // H_q
  int num_kv_heads;    // H_kv
  int head_dim;        // D, a multiple of 16, at most kMaxHeadDim
  float sm_scale_log2; // sm_scale * log2(e): scores are kept in base 2 (exp2 is cheaper)
};

// One split: tokens [tok_begin, tok_end) of sequence `b` (its pages start at kv_indices[page_offset]),
// attended by all query heads. tok_begin is a multiple of kTokenTile.
struct DecodeChunk {
  int b;
  int64_t page_offset;
  int tok_begin;
  int tok_end;
};

constexpr int kMaxHeadDim = 256;
constexpr int kMaxGroupSize = 64;
constexpr int kMaxQoHeads = 256;
constexpr int kTokenTile = 16;  // tokens per tile: one page at FlashInfer's and SGLang's usual page size

// o_partial: [H_q, D] fp32, normalized by the chunk's softmax sum; lse2_partial: [H_q] fp32, base 2.
using DecodeChunkFn = void (*)(const DecodeParams&, const DecodeChunk&, float* o_partial,
                               float* lse2_partial);

DecodeChunkFn decode_chunk_portable(DType dtype);
#if defined(__x86_64__)
// nullptr when the CPU lacks AVX-512 (F/BW/VL/DQ); with_bf16_dot asks for AVX512_BF16 dot products
// and *bf16_dot says whether the returned kernel uses them (it then reads q, never qf).
DecodeChunkFn decode_chunk_avx512(DType dtype, bool with_bf16_dot, bool* bf16_dot);
#endif

}  // namespace omniserve
