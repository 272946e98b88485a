// AVX-512 decode-attention kernels, compiled with per-region target flags so the rest of the
// extension stays portable; decode_chunk_avx512() picks one at run time from CPUID.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "decode_kernel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#define OMNI_NS avx512
#define OMNI_BF16_DOT 0
#include "decode_avx512_impl.h"
#undef OMNI_NS
#undef OMNI_BF16_DOT
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")
#define OMNI_NS avx512_bf16
#define OMNI_BF16_DOT 1
#include "decode_avx512_impl.h"
#undef OMNI_NS
#undef OMNI_BF16_DOT
#pragma GCC pop_options

namespace omniserve {

DecodeChunkFn decode_chunk_avx512(DType dtype, bool with_bf16_dot, bool* bf16_dot) {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  *bf16_dot = false;
  if (!avx512) return nullptr;
  if (with_bf16_dot && dtype == DType::kBFloat16 && __builtin_cpu_supports("avx512bf16")) {
    *bf16_dot = true;
    return avx512_bf16::select(dtype);
  }
  return avx512::select(dtype);
}

}  // namespace omniserve
#endif
