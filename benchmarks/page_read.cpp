// The read ceiling of the decode kernel's access pattern: reads the same scattered pages in the
// same order (per page and KV head, its K rows then its V rows, the next page prefetched) and
// computes nothing but a sum the compiler vectorizes. Built with -O3 -march=native and loaded by
// benchmarks/cpu_attention.py through ctypes.
#include <omp.h>

#include <cstdint>

extern "C" uint64_t read_pages(const char* k, const char* v, const int32_t* pages, int64_t num_pages,
                               int64_t page_bytes, int64_t head_bytes, int num_heads, int threads) {
  uint64_t sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t begin = num_pages * id / nt, end = num_pages * (id + 1) / nt;
    const int64_t words = head_bytes / 8;
    uint64_t acc = 0;
    for (int64_t p = begin; p < end; ++p) {
      const char* next_k = k + pages[p + 1 < end ? p + 1 : p] * page_bytes;
      const char* next_v = v + pages[p + 1 < end ? p + 1 : p] * page_bytes;
      for (int h = 0; h < num_heads; ++h) {
        const int64_t h0 = pages[p] * page_bytes + h * head_bytes;
        for (int64_t o = 0; o < head_bytes; o += 64) {
          __builtin_prefetch(next_k + h * head_bytes + o, 0, 2);
          __builtin_prefetch(next_v + h * head_bytes + o, 0, 2);
        }
        const uint64_t* kw = reinterpret_cast<const uint64_t*>(k + h0);
        const uint64_t* vw = reinterpret_cast<const uint64_t*>(v + h0);
        for (int64_t i = 0; i < words; ++i) acc += kw[i];
        for (int64_t i = 0; i < words; ++i) acc += vw[i];
      }
    }
    sink += acc;
  }
  return sink;
}
