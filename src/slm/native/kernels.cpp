// slm's native decode step: one call runs a cached forward of a few query rows through the whole
// model (the LLaMA-2 math of slm/model.py), inside one OpenMP parallel region.
//
// Why: at batch 1 a decode step is ~30 layers x ~15 small ops. In eager PyTorch each op costs
// microseconds of dispatch and each matmul a fork/join, so a 135M model spends a third of its step
// outside the weight stream; and the int8/int4 matmuls PyTorch offers on AVX2 CPUs convert the
// activations to bf16 and reach a fraction of the memory bound. Here the weights are streamed once
// per step by kernels written for it (llama.cpp's approach: activations quantised to int8 in blocks
// of 32 for the integer dot products), and the threads meet at barriers instead of forking per op.
//
// Batch invariance: every output element is computed by the same code in the same order whatever
// the number of rows in the call, so verifying K+1 speculative tokens in one call gives bit for bit
// the logits of K+1 single-token steps (speculative output stays identical to plain decoding).
//
// Plain C ABI (loaded with ctypes): no Python or torch headers, so it builds in seconds.
// The layout structs mirror slm/native/engine.py; keep the two in step.

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#include <sched.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SLM_AVX2 1
#else
#define SLM_AVX2 0
#endif

extern "C" {

// A linear layer y = x W^T, W (n, k), its weights interleaved (slm/native/engine.py `_interleave`):
// output features in groups of 4 (the last padded with zero features), and within a group block c of
// feature 0, 1, 2, 3, then block c+1 of each, ..., then each feature's tail (k % block elements), so
// a tile of 4 features reads its weights as one run of memory. (Measured on a 1-core SmolLM2 weight
// stream: 1.2x (fp32) and 1.5x (int8) the speed of four row-major rows read side by side.)
//   kind 0: fp32 W, blocks of 8.
//   kind 1: int8 W with one fp32 scale per output feature (s), blocks of 32 (k % 32 == 0).
//   kind 2: 4-bit codes (n, k/2) in blocks of 32 bytes (two quantisation blocks; an odd last one is
//           the tail), per 32-block fp16 scales then mins (sm, (n, 2, k/32), not interleaved):
//           W = q * scale + min, q in 0..15; byte j of a block holds element j (low nibble) and
//           element j + 16 (high nibble), llama.cpp's Q4 layout.
// s and sm have a row for every padded feature too.
struct Lin {
  int32_t kind, n, k, pad;
  const void* w;
  const float* s;
  const uint16_t* sm;
};

struct Layer {
  const float* attn_norm;
  const float* ffn_norm;
  Lin wqkv, wo, w13, w2;
};

struct Model {
  int32_t n_layers, dim, n_heads, n_kv, head_dim, ffn, vocab, cache_len;
  int32_t cache_rows, pad;
  float eps, pad2;
  const float* inv_freq;  // (head_dim / 2,)
  const float* embed;     // (vocab, dim)
  const float* norm;      // (dim,)
  Lin out;
  const Layer* layers;    // (n_layers,)
  float* const* kc;       // (n_layers,) each (cache_rows, n_kv, cache_len, head_dim)
  float* const* vc;
  int64_t cache_row_stride;  // elements between cache rows (n_kv * cache_len * head_dim when contiguous)
};

int slm_native_abi() { return 5; }
int slm_native_simd() { return SLM_AVX2; }

}  // extern "C"

namespace {

// A thread that has waited this long at a barrier yields its core between polls: its partner may be
// waiting for that core (more threads than free cores). Not sooner: a yield hands the core to any
// runnable process, even a niced one, for a whole time slice, and the short waits of a busy server
// (its HTTP thread, its clients) then cost a slice at every barrier (measured: 300 ms steps).
constexpr auto YIELD_AFTER = std::chrono::milliseconds(2);
constexpr int QB = 32;  // quantisation block of activations and of int4 weights
constexpr int MAX_BLOCKS = 512;  // int4 layers take at most MAX_BLOCKS * QB inputs (engine.py checks)
constexpr int GROUP = 4;  // features interleaved in the weights (see Lin)
// Bytes ahead in the weight stream of a 1-row tile of int8/int4 weights, whose dot products are slow
// enough that the hardware prefetcher alone falls behind. fp32 tiles stream faster without it, and
// tiles of more rows are compute-bound: their extra prefetch loads cost more than they bring.
constexpr int PREFETCH = 1024;

// ---- the threads' meeting point ------------------------------------------------------------
//
// Why not OpenMP's own barriers: libgomp spins only ~100 times before sleeping on a futex whenever
// it manages more threads than there are CPUs, which happens as soon as two Python threads have
// each run a parallel region (a server's decoding thread beside the main thread's torch pool). Every
// barrier then costs a futex wake-up: measured on 2 cores, a SmolLM2 step called from a second
// thread took 40 ms against 25 ms from the main thread. This barrier spins (with pause), and
// yields between polls only after a long wait (YIELD_AFTER).
struct Barrier {
  alignas(64) std::atomic<int> arrived{0};
  alignas(64) std::atomic<int> phase{0};
  int n = 1;

  void wait() {
    if (n == 1) return;
    const int p = phase.load(std::memory_order_relaxed);  // cannot advance before this thread arrives
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(p + 1, std::memory_order_release);
      return;
    }
    std::chrono::steady_clock::time_point start;
    for (int spins = 0; phase.load(std::memory_order_acquire) == p; ++spins) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if (spins % 256 == 255) {  // look at the clock now and then (a pause is ~10-150 cycles)
        auto now = std::chrono::steady_clock::now();
        if (spins == 255) start = now;
        else if (now - start > YIELD_AFTER) sched_yield();
      }
    }
  }
};

// ---- small vector helpers --------------------------------------------------------------------

#if SLM_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x in float range: Cephes' expf polynomial after reduction by ln 2 (about 1 ulp).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

inline float dot_f32(const float* a, const float* b, int k) {
  int i = 0;
  float sum = 0.f;
#if SLM_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 32 <= k; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), a3);
  }
  for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
  sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; i < k; ++i) sum += a[i] * b[i];
  return sum;
}

// y += a * x
inline void axpy(float a, const float* x, float* y, int k) {
  int i = 0;
#if SLM_AVX2
  __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= k; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < k; ++i) y[i] += a * x[i];
}

inline float half_to_float(uint16_t h) {
#if SLM_AVX2
  return _cvtsh_ss(h);
#else
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// ---- activations quantised to int8 in blocks of 32 -------------------------------------------

struct QRow {  // one row of k activations: q (k,), scale (k/32,), scale * sum(q) per block (k/32,)
  int8_t* q;
  float* s;
  float* qsum;
};

// Where element i of block b sits in q. Natural: b * QB + i. Paired (int4 layers): the blocks of each
// pair (b, b+1) as [b 0..15 | b+1 0..15 | b 16..31 | b+1 16..31], the order in which one 32-byte
// load of a pair's 4-bit codes unpacks (low nibbles, then high); a last unpaired block stays natural.
inline int q_index(int b, int i, int nb, bool paired) {
  if (!paired || b >= nb - nb % 2) return b * QB + i;
  return (b & ~1) * QB + (i >= 16 ? 32 : 0) + (b & 1) * 16 + (i & 15);
}

void quantize_row(const float* x, int k, QRow out, bool paired) {
  const int nb = k / QB;
  for (int b = 0; b < nb; ++b) {
    const float* xb = x + b * QB;
    float amax = 0.f;
    int i0 = 0;
#if SLM_AVX2
    // max and round-to-nearest-even are exact, so this is the scalar loop's result, 8 at a time.
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 vmax = _mm256_setzero_ps();
    for (int i = 0; i < QB; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#else
    for (int i = 0; i < QB; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
#endif
    float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
#if SLM_AVX2
    alignas(32) int32_t qi[QB];
    const __m256 vid = _mm256_set1_ps(id);
    for (int i = 0; i < QB; i += 8)
      _mm256_store_si256((__m256i*)(qi + i), _mm256_cvtps_epi32(_mm256_round_ps(
          _mm256_mul_ps(_mm256_loadu_ps(xb + i), vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    for (; i0 < QB; ++i0) {
      out.q[q_index(b, i0, nb, paired)] = (int8_t)qi[i0];
      sum += qi[i0];
    }
#endif
    for (int i = i0; i < QB; ++i) {
      int v = (int)std::nearbyint(xb[i] * id);
      out.q[q_index(b, i, nb, paired)] = (int8_t)v;
      sum += v;
    }
    out.s[b] = d;
    out.qsum[b] = d * (float)sum;
  }
}

// ---- the matmul tiles: JB output features x RB rows, each weight block read once per tile --------
//
// g points at a group of GROUP interleaved features (see Lin) and a0 is the tile's first feature in
// it; outputs go to y[r][j + a] for the features j + a < n (the rest are padding).
// Every (feature, row) pair has one accumulator that sums over k in the same order in every tile
// shape, so an output element does not depend on how many rows the call has (batch invariance).

template <int JB, int RB>
void tile_f32(const float* g, int a0, int k, const float* const* x, float* const* y, int j, int n, bool ahead) {
  const int nc = k / 8, tail = k - nc * 8;
  float v[JB][RB];
#if SLM_AVX2
  __m256 acc[JB][RB];
  for (int a = 0; a < JB; ++a)
    for (int r = 0; r < RB; ++r) acc[a][r] = _mm256_setzero_ps();
  // Registers: JB * RB accumulators + RB activations + 1 weight vector (4 x 3 fills all 16).
  for (int c = 0; c < nc; ++c) {
    const float* p = g + (size_t)c * GROUP * 8 + a0 * 8;
    if (RB > 1 && ahead) {  // the next group's lines at this offset (see linear_tiles)
      _mm_prefetch((const char*)(p + (size_t)GROUP * k), _MM_HINT_T0);
      _mm_prefetch((const char*)(p + (size_t)GROUP * k) + 64, _MM_HINT_T0);
    }
    __m256 vx[RB];
    for (int r = 0; r < RB; ++r) vx[r] = _mm256_loadu_ps(x[r] + c * 8);
    for (int a = 0; a < JB; ++a) {
      const __m256 vw = _mm256_loadu_ps(p + a * 8);
      for (int r = 0; r < RB; ++r) acc[a][r] = _mm256_fmadd_ps(vw, vx[r], acc[a][r]);
    }
  }
  for (int a = 0; a < JB; ++a)
    for (int r = 0; r < RB; ++r) v[a][r] = hsum(acc[a][r]);
#else
  for (int a = 0; a < JB; ++a)
    for (int r = 0; r < RB; ++r) {
      v[a][r] = 0.f;
      for (int c = 0; c < nc; ++c)
        for (int t = 0; t < 8; ++t) v[a][r] += g[(size_t)c * GROUP * 8 + (a0 + a) * 8 + t] * x[r][c * 8 + t];
    }
#endif
  const float* gt = g + (size_t)nc * GROUP * 8;  // the features' tails, one after another
  for (int a = 0; a < JB; ++a)
    for (int r = 0; r < RB; ++r) {
      for (int t = 0; t < tail; ++t) v[a][r] += gt[(a0 + a) * tail + t] * x[r][nc * 8 + t];
      if (j + a < n) y[r][j + a] = v[a][r];
    }
}

template <int JB, int RB>
void tile_q8(const int8_t* g, int a0, const float* wscale, int k, const QRow* x, float* const* y, int j, int n,
             bool ahead) {
  const int nb = k / QB;
#if SLM_AVX2
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[JB][RB];
  for (int a = 0; a < JB; ++a)
    for (int r = 0; r < RB; ++r) acc[a][r] = _mm256_setzero_ps();
  for (int b = 0; b < nb; ++b) {
    const int8_t* p = g + (size_t)b * GROUP * QB + a0 * QB;
    if (RB == 1) {
      _mm_prefetch((const char*)p + PREFETCH, _MM_HINT_T0);
      _mm_prefetch((const char*)p + PREFETCH + 64, _MM_HINT_T0);
    } else if (ahead) {
      _mm_prefetch((const char*)(p + (size_t)GROUP * k), _MM_HINT_T0);
      _mm_prefetch((const char*)(p + (size_t)GROUP * k) + 64, _MM_HINT_T0);
    }
    __m256i vw[JB], aw[JB];
    for (int a = 0; a < JB; ++a) {
      vw[a] = _mm256_loadu_si256((const __m256i*)(p + a * QB));
      aw[a] = _mm256_sign_epi8(vw[a], vw[a]);
    }
    for (int r = 0; r < RB; ++r) {
      __m256i vx = _mm256_loadu_si256((const __m256i*)(x[r].q + b * QB));
      __m256 xs = _mm256_set1_ps(x[r].s[b]);
      for (int a = 0; a < JB; ++a) {
        // maddubs multiplies unsigned by signed bytes: move w's sign onto x. |w|, |x| <= 127, so
        // the pairwise int16 sums (<= 2 * 127 * 127) never saturate.
        __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[a], _mm256_sign_epi8(vx, vw[a])), ones);
        acc[a][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), xs, acc[a][r]);
      }
    }
  }
  for (int a = 0; a < JB; ++a)
    for (int r = 0; r < RB; ++r)
      if (j + a < n) y[r][j + a] = hsum(acc[a][r]) * wscale[a];
#else
  for (int a = 0; a < JB; ++a)
    for (int r = 0; r < RB; ++r) {
      float sum = 0.f;
      for (int b = 0; b < nb; ++b) {
        const int8_t* p = g + (size_t)b * GROUP * QB + (a0 + a) * QB;
        int d = 0;
        for (int i = 0; i < QB; ++i) d += (int)p[i] * (int)x[r].q[b * QB + i];
        sum += (float)d * x[r].s[b];
      }
      if (j + a < n) y[r][j + a] = sum * wscale[a];
    }
#endif
}

template <int JB, int RB>
void tile_q4(const uint8_t* g, int a0, const uint16_t* sm, int k, const QRow* x, float* const* y, int j, int n) {
  // sm row a: nb fp16 scales, then nb fp16 mins. Per (feature, row): the block weights scale * x_scale
  // are computed 8 at a time up front (off the dot product's critical path), and the min term
  // sum_b min[b] * x_scale[b] * sum(qx in b) is a short dot product of its own.
  const int nb = k / QB, np = nb / 2;
  const uint8_t* gt = g + (size_t)np * GROUP * 32;  // an odd last block: 16 bytes per feature
  float msum[JB][RB];
  alignas(32) float sx[JB][RB][MAX_BLOCKS];
  for (int a = 0; a < JB; ++a) {
    const uint16_t* scales = sm + (size_t)a * nb * 2;
    const uint16_t* mins = scales + nb;
    for (int r = 0; r < RB; ++r) {
      float m = 0.f;
      int b = 0;
#if SLM_AVX2
      __m256 vm = _mm256_setzero_ps();
      for (; b + 8 <= nb; b += 8) {
        __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scales + b)));
        _mm256_store_ps(&sx[a][r][b], _mm256_mul_ps(sc, _mm256_loadu_ps(x[r].s + b)));
        vm = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mins + b))), _mm256_loadu_ps(x[r].qsum + b), vm);
      }
      m = hsum(vm);
#endif
      for (; b < nb; ++b) {
        sx[a][r][b] = half_to_float(scales[b]) * x[r].s[b];
        m += half_to_float(mins[b]) * x[r].qsum[b];
      }
      msum[a][r] = m;
    }
  }
#if SLM_AVX2
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f);
  __m256 acc[JB][RB];
  for (int a = 0; a < JB; ++a)
    for (int r = 0; r < RB; ++r) acc[a][r] = _mm256_setzero_ps();
  // Two blocks per step: one 32-byte load holds both blocks' codes; its low nibbles are elements
  // 0..15 of each, its high nibbles 16..31, matching the paired activations (q_index), so nothing
  // is shuffled. The int32 sums of block b land in lanes 0..3, of b+1 in lanes 4..7.
  const __m256i pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  for (int pi = 0; pi < np; ++pi) {
    const int b = 2 * pi;
    const uint8_t* p = g + (size_t)pi * GROUP * 32 + a0 * 32;
    if (RB == 1) {
      _mm_prefetch((const char*)p + PREFETCH, _MM_HINT_T0);
      _mm_prefetch((const char*)p + PREFETCH + 64, _MM_HINT_T0);
    }
    __m256i lo[JB], hi[JB];
    for (int a = 0; a < JB; ++a) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(p + a * 32));
      lo[a] = _mm256_and_si256(v, low);
      hi[a] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    for (int r = 0; r < RB; ++r) {
      const __m256i xlo = _mm256_loadu_si256((const __m256i*)(x[r].q + b * QB));
      const __m256i xhi = _mm256_loadu_si256((const __m256i*)(x[r].q + b * QB + 32));
      for (int a = 0; a < JB; ++a) {
        // q <= 15, |x| <= 127: each int16 sum <= 2 * 15 * 127, two of them still fit.
        __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo[a], xlo), _mm256_maddubs_epi16(hi[a], xhi));
        __m256 sc = _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd((const double*)&sx[a][r][b]))), pair);
        acc[a][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)), sc, acc[a][r]);
      }
    }
  }
  if (nb % 2) {  // a last unpaired block
    const int b = nb - 1;
    __m256i q[JB];
    for (int a = 0; a < JB; ++a) {
      __m128i v = _mm_loadu_si128((const __m128i*)(gt + (a0 + a) * 16));
      q[a] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low);  // elements 0..31, each 0..15
    }
    for (int r = 0; r < RB; ++r) {
      __m256i vx = _mm256_loadu_si256((const __m256i*)(x[r].q + b * QB));
      for (int a = 0; a < JB; ++a) {
        __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(q[a], vx), ones);  // q <= 15: no saturation
        acc[a][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sx[a][r][b]), acc[a][r]);
      }
    }
  }
  for (int a = 0; a < JB; ++a)
    for (int r = 0; r < RB; ++r)
      if (j + a < n) y[r][j + a] = hsum(acc[a][r]) + msum[a][r];
#else
  for (int a = 0; a < JB; ++a)
    for (int r = 0; r < RB; ++r) {
      float sum = 0.f;
      for (int b = 0; b < nb; ++b) {
        // block b: its pair's 32 bytes (b+1 of a pair: the second 16), or the odd last block's 16
        const uint8_t* c = b / 2 < np ? g + (size_t)(b / 2) * GROUP * 32 + (a0 + a) * 32 + (b % 2) * 16 : gt + (a0 + a) * 16;
        int d = 0;
        for (int i = 0; i < 16; ++i)
          d += (int)(c[i] & 0x0f) * (int)x[r].q[q_index(b, i, nb, true)] +
               (int)(c[i] >> 4) * (int)x[r].q[q_index(b, i + 16, nb, true)];
        sum += (float)d * sx[a][r][b];
      }
      if (j + a < n) y[r][j + a] = sum + msum[a][r];
    }
#endif
}

// One tile of lin at features j.. (JB of them, within one group) and rows x[0..RB) -> y[r][j..].
template <int JB, int RB>
void tile(const Lin& lin, int j, const float* const* xf, const QRow* xq, float* const* y, bool ahead) {
  const size_t k = (size_t)lin.k, group = (size_t)(j / GROUP) * GROUP;
  const int a0 = j % GROUP;
  if (lin.kind == 0) {
    tile_f32<JB, RB>((const float*)lin.w + group * k, a0, lin.k, xf, y, j, lin.n, ahead);
  } else if (lin.kind == 1) {
    tile_q8<JB, RB>((const int8_t*)lin.w + group * k, a0, lin.s + j, lin.k, xq, y, j, lin.n, ahead);
  } else {
    tile_q4<JB, RB>((const uint8_t*)lin.w + group * (k / 2), a0, lin.sm + j * (k / QB) * 2, lin.k, xq, y, j, lin.n);
  }
}

template <int JB, int TR>
void tile_rows(const Lin& lin, int j, int rb, const float* const* xf, const QRow* xq, float* const* y, bool ahead) {
  static_assert(TR >= 1 && TR <= 4, "tiles of 1 to 4 rows");
  switch (rb) {
    case 1: tile<JB, 1>(lin, j, xf, xq, y, ahead); break;
    case 2: if constexpr (TR >= 2) tile<JB, 2>(lin, j, xf, xq, y, ahead); break;
    case 3: if constexpr (TR >= 3) tile<JB, 3>(lin, j, xf, xq, y, ahead); break;
    default: if constexpr (TR >= 4) tile<JB, 4>(lin, j, xf, xq, y, ahead); break;
  }
}

// ---- the building blocks, each called by every thread of the parallel region -----------------

// Rows of activations, fp32 and (for quantised layers) their int8 blocks.
struct Acts {
  std::vector<float> f;
  std::vector<int8_t> q;
  std::vector<float> s, qsum;
  int k = 0;
  void resize(int rows, int k_) {
    k = k_;
    f.assign((size_t)rows * k, 0.f);
    q.assign((size_t)rows * k, 0);
    s.assign((size_t)rows * k / QB + 1, 0.f);
    qsum.assign((size_t)rows * k / QB + 1, 0.f);
  }
  float* row(int r) { return f.data() + (size_t)r * k; }
  QRow qrow(int r) { return QRow{q.data() + (size_t)r * k, s.data() + (size_t)r * k / QB, qsum.data() + (size_t)r * k / QB}; }
};

// Quantise rows (when `lin` needs it). Work-shared over rows, then a barrier.
void prepare_input(const Lin& lin, Acts& a, int rows, Barrier& bar) {
  if (lin.kind != 0) {
#pragma omp for schedule(static) nowait
    for (int r = 0; r < rows; ++r) quantize_row(a.row(r), a.k, a.qrow(r), lin.kind == 2);
    bar.wait();
  }
}

// y (rows, lin.n) = x W^T in tiles of TJ features x TR rows, work-shared over the feature tiles; a
// barrier at the end.
template <int TJ, int TR>
void linear_tiles(const Lin& lin, Acts& x, int rows, float* y, Barrier& bar) {
  static_assert(GROUP % TJ == 0, "a tile's features lie in one group");
  const int n = lin.n;
  // Rows per tile, of `left` rows still to do: groups of TR, but never a lone row after a group: a
  // 1-row tile has only TJ accumulator chains and waits on the FMA latency (5 rows go as 3 + 2).
  auto take = [](int left) { return left == TR + 1 && TR > 2 ? 2 : (left < TR ? left : TR); };
  const int first = take(rows);
#pragma omp for schedule(static) nowait
  for (int jt = 0; jt < (n + TJ - 1) / TJ; ++jt) {
    const int j = jt * TJ;
    for (int r0 = 0, rb; r0 < rows; r0 += rb) {
      rb = take(rows - r0);
      const float* xf[TR];
      QRow xq[TR];
      float* yr[TR];
      for (int r = 0; r < rb; ++r) {
        xf[r] = x.row(r0 + r);
        xq[r] = x.qrow(r0 + r);
        yr[r] = y + (size_t)(r0 + r) * n;
      }
      // With more rows than one tile takes, the group is read again from cache for the next rows: a
      // compute-bound pass during which no weight streams in. Every pass then prefetches the next
      // group (fp32; measured 1.1-1.15x on 4-16 rows; one pass alone is better without).
      const bool ahead = rows > first && j + TJ < n;
      tile_rows<TJ, TR>(lin, j, rb, xf, xq, yr, ahead);  // (features past n: padding, not stored)
    }
  }
  bar.wait();
}

// One row (a decode step): the 4 features of a group at a time, four independent accumulator
// chains, one run of weight memory. More rows (verification, batched steps) share each weight block
// loaded: fp32 4 features x 3 rows (12 accumulator chains), int8 4 x 2 (its sign-folded weights take
// registers too), int4 2 x 4 (half a group per tile; measured faster than 4 x 2 for it). The tile
// shape never changes the order in which an output element is summed.
void linear(const Lin& lin, Acts& x, int rows, float* y, Barrier& bar) {
  if (rows == 1) {
    linear_tiles<4, 1>(lin, x, rows, y, bar);
  } else if (lin.kind == 0) {
    linear_tiles<4, 3>(lin, x, rows, y, bar);
  } else if (lin.kind == 1) {
    linear_tiles<4, 2>(lin, x, rows, y, bar);
  } else {
    linear_tiles<2, 4>(lin, x, rows, y, bar);
  }
}

void rmsnorm(const float* x, const float* w, float* y, int n, float eps) {
  float ss = 0.f;
  int i0 = 0;
#if SLM_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i0 + 8 <= n; i0 += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i0), _mm256_loadu_ps(x + i0), acc);
  ss = hsum(acc);
#endif
  for (int i = i0; i < n; ++i) ss += x[i] * x[i];
  float inv = 1.f / std::sqrt(ss / (float)n + eps);
  for (int i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// Rotate one head in place (the non-interleaved "rotate_half" layout of Hugging Face LLaMA).
void rope(float* h, const float* cos_, const float* sin_, int hd) {
  int half = hd / 2;
  for (int i = 0; i < half; ++i) {
    float x1 = h[i], x2 = h[i + half];
    h[i] = x1 * cos_[i] - x2 * sin_[i];
    h[i + half] = x2 * cos_[i] + x1 * sin_[i];
  }
}

// In-place softmax numerators: s[j] = exp(s[j] - max), returns their sum.
float softmax_numerators(float* s, int n) {
  float mx = -INFINITY;
  for (int j = 0; j < n; ++j) mx = std::fmax(mx, s[j]);
  float sum = 0.f;
  int j = 0;
#if SLM_AVX2
  __m256 vmx = _mm256_set1_ps(mx), vs = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx));
    _mm256_storeu_ps(s + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  sum = hsum(vs);
#endif
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  return sum;
}

// a (n,) = silu(gate) * up
void swiglu(const float* gate, const float* up, float* a, int n) {
  int i = 0;
#if SLM_AVX2
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 g = _mm256_loadu_ps(gate + i);
    __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, g))));
    _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) a[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

}  // namespace

extern "C" {

// Forward `rows` query rows: row r is token tokens[r] of cache row seq[r] at position pos[r]. Each
// row's keys/values are written into its cache row at its position; each query attends to positions
// 0..pos[r] of its own cache row (so rows written by this call are seen by later positions of the
// same sequence, as in Transformer.forward). Logits of rows logit_rows[0..n_logits) go to logits
// (n_logits, vocab). The residual stream after layer tap_layers[t] (a block's output) of row r goes
// to taps[r, t*dim : (t+1)*dim] (taps: (rows, n_taps*dim), the layout of a feature draft's buffer).
// Returns 0, or a negative code for arguments out of range (nothing is written).
int slm_forward(const Model* m, int rows, const int64_t* tokens, const int64_t* seq, const int64_t* pos,
                int n_logits, const int64_t* logit_rows, float* logits, int n_taps, const int32_t* tap_layers,
                float* taps, int nthreads) {
  const int D = m->dim, H = m->n_heads, Hkv = m->n_kv, hd = m->head_dim, F = m->ffn;
  const int qkv_n = (H + 2 * Hkv) * hd, S = m->cache_len;
  for (int r = 0; r < rows; ++r) {
    if (tokens[r] < 0 || tokens[r] >= m->vocab) return -1;
    if (seq[r] < 0 || seq[r] >= m->cache_rows) return -2;
    if (pos[r] < 0 || pos[r] >= S) return -3;
  }
  for (int i = 0; i < n_logits; ++i)
    if (logit_rows[i] < 0 || logit_rows[i] >= rows) return -4;
  for (int t = 0; t < n_taps; ++t)
    if (tap_layers[t] < 0 || tap_layers[t] >= m->n_layers) return -5;

  std::vector<float> x((size_t)rows * D), qkv((size_t)rows * qkv_n), y((size_t)rows * D);
  std::vector<float> gu((size_t)rows * 2 * F), cs((size_t)rows * hd);  // cos | sin per row
  Acts h, att, a, fin;
  h.resize(rows, D);
  att.resize(rows, H * hd);
  a.resize(rows, F);
  fin.resize(n_logits, D);
  if (nthreads < 1) nthreads = 1;
  std::vector<float> scores((size_t)nthreads * S);
  const float scale = 1.f / std::sqrt((float)hd);
  const int group = H / Hkv;

  for (int r = 0; r < rows; ++r) {
    std::memcpy(x.data() + (size_t)r * D, m->embed + (size_t)tokens[r] * D, sizeof(float) * D);
    for (int i = 0; i < hd / 2; ++i) {
      float f = (float)pos[r] * m->inv_freq[i];
      cs[(size_t)r * hd + i] = std::cos(f);
      cs[(size_t)r * hd + hd / 2 + i] = std::sin(f);
    }
  }

  Barrier bar;
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp single
    bar.n = omp_get_num_threads();  // (single ends with OpenMP's barrier: every thread sees n)
    float* sc = scores.data() + (size_t)omp_get_thread_num() * S;
    for (int l = 0; l < m->n_layers; ++l) {
      const Layer& L = m->layers[l];
      float *kc = m->kc[l], *vc = m->vc[l];
#pragma omp for schedule(static) nowait
      for (int r = 0; r < rows; ++r) rmsnorm(x.data() + (size_t)r * D, L.attn_norm, h.row(r), D, m->eps);
      bar.wait();
      prepare_input(L.wqkv, h, rows, bar);
      linear(L.wqkv, h, rows, qkv.data(), bar);
      // RoPE on q and k heads; k and v into the cache at (seq, pos).
#pragma omp for schedule(static) nowait
      for (int r = 0; r < rows; ++r) {
        float* row = qkv.data() + (size_t)r * qkv_n;
        const float* c = cs.data() + (size_t)r * hd;
        for (int hh = 0; hh < H + Hkv; ++hh) rope(row + hh * hd, c, c + hd / 2, hd);
        for (int g = 0; g < Hkv; ++g) {
          size_t at = (size_t)seq[r] * m->cache_row_stride + ((size_t)g * S + pos[r]) * hd;
          std::memcpy(kc + at, row + (H + g) * hd, sizeof(float) * hd);
          std::memcpy(vc + at, row + (H + Hkv + g) * hd, sizeof(float) * hd);
        }
      }
      bar.wait();
      // Attention: each (row, head) over positions 0..pos of its cache row.
#pragma omp for schedule(static) collapse(2) nowait
      for (int r = 0; r < rows; ++r) {
        for (int hh = 0; hh < H; ++hh) {
          const float* q = qkv.data() + (size_t)r * qkv_n + hh * hd;
          size_t base = (size_t)seq[r] * m->cache_row_stride + (size_t)(hh / group) * S * hd;
          const float *kb = kc + base, *vb = vc + base;
          int n = (int)pos[r] + 1;
          for (int j = 0; j < n; ++j) sc[j] = dot_f32(q, kb + (size_t)j * hd, hd) * scale;
          float inv = 1.f / softmax_numerators(sc, n);
          float* o = att.row(r) + hh * hd;
          std::memset(o, 0, sizeof(float) * hd);
          for (int j = 0; j < n; ++j) axpy(sc[j] * inv, vb + (size_t)j * hd, o, hd);
        }
      }
      bar.wait();
      prepare_input(L.wo, att, rows, bar);
      linear(L.wo, att, rows, y.data(), bar);
#pragma omp for schedule(static) nowait
      for (int r = 0; r < rows; ++r) {
        float* xr = x.data() + (size_t)r * D;
        for (int i = 0; i < D; ++i) xr[i] += y[(size_t)r * D + i];
        rmsnorm(xr, L.ffn_norm, h.row(r), D, m->eps);
      }
      bar.wait();
      prepare_input(L.w13, h, rows, bar);
      linear(L.w13, h, rows, gu.data(), bar);
#pragma omp for schedule(static) nowait
      for (int r = 0; r < rows; ++r) {
        const float* g = gu.data() + (size_t)r * 2 * F;
        swiglu(g, g + F, a.row(r), F);
      }
      bar.wait();
      prepare_input(L.w2, a, rows, bar);
      linear(L.w2, a, rows, y.data(), bar);
#pragma omp for schedule(static) nowait
      for (int r = 0; r < rows; ++r) {
        float* xr = x.data() + (size_t)r * D;
        for (int i = 0; i < D; ++i) xr[i] += y[(size_t)r * D + i];
        for (int t = 0; t < n_taps; ++t)
          if (tap_layers[t] == l) std::memcpy(taps + ((size_t)r * n_taps + t) * D, xr, sizeof(float) * D);
      }
      bar.wait();
    }
#pragma omp for schedule(static) nowait
    for (int i = 0; i < n_logits; ++i) rmsnorm(x.data() + (size_t)logit_rows[i] * D, m->norm, fin.row(i), D, m->eps);
    bar.wait();
    prepare_input(m->out, fin, n_logits, bar);
    linear(m->out, fin, n_logits, logits, bar);
  }
  return 0;
}

}  // extern "C"

extern "C" {

// y (rows, lin->n) = x (rows, lin->k) W^T with the kernels slm_forward uses (for tests and benchmarks).
int slm_linear(const Lin* lin, int rows, const float* x, float* y, int nthreads) {
  if (rows < 1 || (lin->kind != 0 && lin->k % QB)) return -4;
  Acts a;
  a.resize(rows, lin->k);
  std::memcpy(a.f.data(), x, sizeof(float) * (size_t)rows * lin->k);
  Barrier bar;
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
  {
#pragma omp single
    bar.n = omp_get_num_threads();
    prepare_input(*lin, a, rows, bar);
    linear(*lin, a, rows, y, bar);
  }
  return 0;
}

}  // extern "C"
