// GEMMs on checkpoint-format weights (FP8 e4m3 with 128x128 e8m0 scales, FP4 e2m1 with 1x32 e8m0 scales,
// bf16), in the official kernels' accumulation order: y[m,n] = sum over K-blocks, in increasing k, of
// (s_x[m] * s_w[n]) * (sum_{k in block} x[m,k] * w[n,k]), all in fp32.
//
// Every output element is computed by one fixed sequence of IEEE operations, whatever M, the tiling, the
// thread count or the instruction set. The partial sum of a block is the chain p = +0, p = fma(x[k], w[k], p)
// for k in increasing order; the accumulator is acc = +0, acc = fma(p, s_x * s_w, acc) block by block (p * s
// is exact: s is a power of two). bf16 weights have no blocks: y is one chain over all of K. This is what
// makes a row's result independent of its batch (a decode row equals its prefill row) and the AVX-512 and
// portable paths bit-identical. Because each chain runs along k, the SIMD lanes hold 16 output features n:
// weight rows are loaded 16 at a time and transposed in registers.
//
// Two schedules compute that same arithmetic:
// * panel (any M): a chunk of 128 k of up to 512 weight rows is decoded into an fp32 "panel" [k][32 rows] in
//   cache and reused by every activation row; a 12-row x 32-feature microkernel broadcasts x[m, k].
// * fused (AVX-512, M <= 16, decode): the transposed bytes of 16 (FP4 with M = 1: 32) weight rows are decoded
//   right before their FMAs and nothing fp32 is stored; few rows at a time keep the number of memory streams
//   small, which measured faster than more independent chains.
//
// FP8 values are decoded to fp16 bit patterns (sign, exponent, mantissa shifted into place), which are the
// e4m3 value times 2^-8 (subnormals included), and the activations are multiplied by 2^8: each product
// (2^8 x) (2^-8 w) is then the same real number as x w, so every rounding is the same, as long as 2^8 x does
// not overflow (|x| < 2^120). The two e4m3 NaN codes decode as +-480 (checkpoints hold none).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "x86.h"

namespace {

constexpr int NR = 32;   // output features per panel strip: two 16-lane vectors
constexpr int KC = 128;  // K per panel chunk: one FP8 block, four FP4 blocks
constexpr int MR = 12;   // activation rows per microkernel call (2 x 12 partial-sum vectors in registers)
constexpr int FP8_BLOCK = 128;
constexpr int FP4_BLOCK = 32;
constexpr int ACT_BLOCK = 128;
constexpr int64_t FUSED_MAX_M = 16;  // decode: the fused schedule up to this many activation rows
constexpr int64_t FUSED_TILE = 16;   // activation rows per fused pass (partial sums in registers)

enum Fmt { FP8 = 0, FP4 = 1, BF16 = 2 };

struct Problem {
  const float* x;     // [M, K] fp32
  const float* xs;    // [M, ceil(K/128)] fp32 activation scales, or null (= 1)
  const uint8_t* w;   // FP8 [N, K] bytes, FP4 [N, K/2] bytes, bf16 [N, K] as 2-byte words
  const uint8_t* ws;  // e8m0 bytes: FP8 [ceil(N/128), ceil(K/128)], FP4 [N, K/32]; null for bf16
  float* y;           // [M, N] fp32
  int64_t M, N, K;
  Fmt fmt;

  int64_t kb_act() const { return (K + ACT_BLOCK - 1) / ACT_BLOCK; }
  int64_t row_bytes() const { return fmt == FP8 ? K : fmt == FP4 ? K / 2 : 2 * K; }
  float act_scale(int64_t m, int64_t k) const { return xs ? xs[m * kb_act() + k / ACT_BLOCK] : 1.0f; }
};

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// e8m0 byte e -> 2^(e-127); 0 is the subnormal 2^-127, 255 is NaN.
inline float e8m0(uint8_t e) {
  if (e == 255) return NAN;
  return bits_to_float(e ? uint32_t(e) << 23 : 0x00400000u);
}

// The FP8 weight scale of row n's block at column k.
inline float fp8_weight_scale(const Problem& p, int64_t n, int64_t k) {
  return e8m0(p.ws[n / FP8_BLOCK * ((p.K + FP8_BLOCK - 1) / FP8_BLOCK) + k / FP8_BLOCK]);
}

// The factor activations are multiplied by (exactly) to undo the fp16 decoding's 2^-8 of FP8 weights.
inline float x_factor(Fmt f) { return f == FP8 ? 256.0f : 1.0f; }

// e2m1 nibble -> value (bit 3 is the sign).
alignas(64) const float fp4_values[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                          -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  if (exp == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(float(man), -24);
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

// e4m3 byte -> its value times 2^-8: the fp16 number (b & 0x80) << 8 | (b & 0x7F) << 7.
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) v[b] = fp16_bits_to_float(uint16_t(((b & 0x80) << 8) | ((b & 0x7F) << 7)));
  }
};
const Fp8Table fp8_table;

// Per-thread scratch (panel, scales, packed activations), reused across calls.
struct Scratch {
  float* data = nullptr;
  int64_t capacity = 0;
  float* get(int64_t floats) {
    if (floats > capacity) {
      std::free(data);
      data = static_cast<float*>(std::aligned_alloc(64, ((floats * 4 + 63) / 64) * 64));
      capacity = floats;
    }
    return data;
  }
  ~Scratch() { std::free(data); }
};
thread_local Scratch scratch;

// A panel task's current chunk: strip s covers rows n0 + 32 s .., its k-th row of 32 floats at
// panel + (s * KC + k) * NR; FP4 block scales at scales + (s * (KC / 32) + b) * NR; activations of rows
// [m0, m1) packed per MR-row tile as [k][MR] (the microkernel's broadcasts then read consecutive addresses:
// rows of x are K floats apart, which for K a multiple of 1024 puts them all on the same L1 sets).
struct Chunk {
  float* panel;
  float* scales;
  float* xpack;
  int64_t n0, rows, m0, m1, k0, kcur;

  int64_t strips() const { return (rows + NR - 1) / NR; }
  const float* x_tile(int64_t m) const { return xpack + (m - m0) / MR * KC * MR; }
};

// ---------------------------------------------------------------------------------------------------------
// Portable path: the panel schedule in plain C++ (std::fma is one IEEE fused multiply-add). On x86 the hot
// loops are also compiled for AVX2 + FMA (chosen at load time), where std::fma is an instruction; elsewhere
// it may be a library call, exact but slow.

#if DSV4_X86
#define PORTABLE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PORTABLE_CLONES
#endif

PORTABLE_CLONES void fill_portable(const Problem& p, const Chunk& c) {
  for (int64_t s = 0; s < c.strips(); ++s)
    for (int r = 0; r < NR; ++r) {
      const int64_t n = c.n0 + s * NR + r;
      float* out = c.panel + s * KC * NR + r;
      if (n >= p.N) {
        for (int64_t kk = 0; kk < c.kcur; ++kk) out[kk * NR] = 0.0f;
      } else if (p.fmt == FP8) {
        const uint8_t* w = p.w + n * p.K + c.k0;
        for (int64_t kk = 0; kk < c.kcur; ++kk) out[kk * NR] = fp8_table.v[w[kk]];
      } else if (p.fmt == FP4) {
        const uint8_t* w = p.w + n * (p.K / 2) + c.k0 / 2;
        for (int64_t kk = 0; kk < c.kcur; kk += 2) {
          out[kk * NR] = fp4_values[w[kk / 2] & 0xF];
          out[(kk + 1) * NR] = fp4_values[w[kk / 2] >> 4];
        }
      } else {
        const uint8_t* w = p.w + 2 * (n * p.K + c.k0);
        for (int64_t kk = 0; kk < c.kcur; ++kk) {
          uint16_t h;
          std::memcpy(&h, w + 2 * kk, 2);
          out[kk * NR] = bits_to_float(uint32_t(h) << 16);
        }
      }
    }
}

// FP4 block scales of a chunk as [strip][block][lane] (rows past N get 0).
void fill_fp4_scales(const Problem& p, const Chunk& c) {
  const int64_t nb = c.kcur / FP4_BLOCK, ld = p.K / FP4_BLOCK;
  for (int64_t s = 0; s < c.strips(); ++s)
    for (int64_t b = 0; b < nb; ++b)
      for (int r = 0; r < NR; ++r) {
        const int64_t n = c.n0 + s * NR + r;
        c.scales[(s * (KC / FP4_BLOCK) + b) * NR + r] = n < p.N ? e8m0(p.ws[n * ld + c.k0 / FP4_BLOCK + b]) : 0.0f;
      }
}

void pack_x_portable(const Problem& p, const Chunk& c) {
  for (int64_t m = c.m0; m < c.m1; ++m) {
    float* out = c.xpack + (m - c.m0) / MR * KC * MR + (m - c.m0) % MR;
    for (int64_t k = 0; k < c.kcur; ++k) out[k * MR] = p.x[m * p.K + c.k0 + k] * x_factor(p.fmt);
  }
}

PORTABLE_CLONES void micro_portable(const Problem& p, const Chunk& c, int64_t m0, int rows_m, int64_t strip) {
  const float* panel = c.panel + strip * KC * NR;
  const int64_t nbase = c.n0 + strip * NR;
  const int lanes = int(std::min<int64_t>(NR, p.N - nbase));
  const int64_t blen = p.fmt == FP4 ? FP4_BLOCK : c.kcur;
  for (int mi = 0; mi < rows_m; ++mi) {
    const int64_t m = m0 + mi;
    const float* xt = c.x_tile(m0) + mi;
    float* y = p.y + m * p.N + nbase;
    float part[NR], acc[NR];
    for (int l = 0; l < NR; ++l) acc[l] = (c.k0 > 0 && l < lanes) ? y[l] : 0.0f;
    for (int64_t b0 = 0; b0 < c.kcur; b0 += blen) {
      for (int l = 0; l < NR; ++l) part[l] = p.fmt == BF16 ? acc[l] : 0.0f;  // bf16: one chain, carried in y
      for (int64_t k = b0; k < b0 + blen; ++k)
        for (int l = 0; l < NR; ++l) part[l] = std::fma(xt[k * MR], panel[k * NR + l], part[l]);
      for (int l = 0; l < NR; ++l) {
        if (p.fmt == BF16) {
          acc[l] = part[l];
        } else {
          const float sw = p.fmt == FP8 ? fp8_weight_scale(p, nbase + l, c.k0)
                                        : c.scales[(strip * (KC / FP4_BLOCK) + b0 / FP4_BLOCK) * NR + l];
          acc[l] = std::fma(part[l], p.act_scale(m, c.k0 + b0) * sw, acc[l]);
        }
      }
    }
    for (int l = 0; l < lanes; ++l) y[l] = acc[l];
  }
}

#if DSV4_X86
// ---------------------------------------------------------------------------------------------------------
// AVX-512.

// 16 weight rows from row n: `bytes` (<= 64) bytes at byte column `col`, transposed to dword columns;
// rows past N read as zero. Also prefetches the same rows `ahead` bytes further on.
AVX512 inline void load_transposed(const Problem& p, int64_t n, int64_t col, int bytes, int64_t ahead, __m512i r[16]) {
  const __mmask64 mask = bytes >= 64 ? ~__mmask64(0) : ((__mmask64(1) << bytes) - 1);
  const int64_t stride = p.row_bytes();
  const uint8_t* base = p.w + n * stride + col;
  for (int i = 0; i < 16; ++i) {
    if (n + i < p.N) {
      r[i] = _mm512_maskz_loadu_epi8(mask, base + i * stride);
      _mm_prefetch(reinterpret_cast<const char*>(base + i * stride + ahead), _MM_HINT_T0);
    } else {
      r[i] = _mm512_setzero_si512();
    }
  }
  transpose16(r);
}

// FP8: vpermb index that puts byte (w >> 4) + 2 h of dword (w & 15) into the high byte of word w, so that
// one shuffle yields the fp16 candidates of two consecutive k (the low bytes are masked away).
AVX512 inline __m512i fp8_pair_index(int h) {
  alignas(64) uint8_t idx[64];
  for (int b = 0; b < 64; ++b) idx[b] = (b & 1) ? uint8_t(4 * ((b / 2) & 15) + 2 * h + (b / 32)) : 0;
  return _mm512_load_si512(idx);
}

// Columns k = 2h and 2h + 1 of a transposed FP8 dword column, as fp32 (value x 2^-8).
AVX512 inline void fp8_decode_pair(__m512i col, __m512i index, __m512& k0, __m512& k1) {
  __m512i v = _mm512_permutexvar_epi8(index, col);
  v = _mm512_and_si512(_mm512_srai_epi16(v, 1), _mm512_set1_epi16(int16_t(0xBF80)));
  k0 = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
  k1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
}

// 16 e8m0 bytes (one per dword, in byte `b` of each) -> fp32 scales.
AVX512 inline __m512 e8m0_lanes(__m512i dwords, int b) {
  const __m512i e = _mm512_and_si512(_mm512_srli_epi32(dwords, 8 * b), _mm512_set1_epi32(0xFF));
  __m512i bits = _mm512_slli_epi32(e, 23);
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), _mm512_set1_epi32(0x00400000));
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(0xFF)), _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(bits);
}

// The FP4 scale bytes of blocks kb .. kb+3 of 16 rows from n (one dword per row; rows past N, and blocks
// past K, read as zero).
AVX512 inline __m512i fp4_scale_dwords(const Problem& p, int64_t n, int64_t kb) {
  const int64_t ld = p.K / FP4_BLOCK, nb = std::min<int64_t>(4, ld - kb);
  alignas(64) uint32_t d[16];
  for (int i = 0; i < 16; ++i) {
    d[i] = 0;
    if (n + i >= p.N) continue;
    if (nb == 4) d[i] = *reinterpret_cast<const uint32_t*>(p.ws + (n + i) * ld + kb);  // x86: unaligned is fine
    else std::memcpy(&d[i], p.ws + (n + i) * ld + kb, nb);
  }
  return _mm512_load_si512(d);
}

// --- panel schedule ---------------------------------------------------------------------------------------

AVX512 void fill_avx512(const Problem& p, const Chunk& c) {
  __m512i r[16];
  for (int64_t s = 0; s < c.strips(); ++s)
    for (int g = 0; g < 2; ++g) {
      float* panel = c.panel + s * KC * NR + 16 * g;
      const int64_t n = c.n0 + s * NR + 16 * g;
      if (p.fmt == FP8) {
        const __m512i lo = fp8_pair_index(0), hi = fp8_pair_index(1);
        for (int64_t c0 = 0; c0 < c.kcur; c0 += 64) {
          load_transposed(p, n, c.k0 + c0, int(std::min<int64_t>(64, c.kcur - c0)), KC, r);
          for (int j = 0; j < 16 && 4 * j < c.kcur - c0; ++j) {
            float* out = panel + (c0 + 4 * j) * NR;
            __m512 a, b;
            fp8_decode_pair(r[j], lo, a, b);
            _mm512_store_ps(out, a);
            _mm512_store_ps(out + NR, b);
            fp8_decode_pair(r[j], hi, a, b);
            _mm512_store_ps(out + 2 * NR, a);
            _mm512_store_ps(out + 3 * NR, b);
          }
        }
      } else if (p.fmt == FP4) {
        const __m512 table = _mm512_load_ps(fp4_values);
        load_transposed(p, n, c.k0 / 2, int(c.kcur / 2), KC / 2, r);
        for (int j = 0; j < c.kcur / 8; ++j)
          for (int i = 0; i < 8; ++i)
            _mm512_store_ps(panel + (8 * j + i) * NR, _mm512_permutexvar_ps(_mm512_srli_epi32(r[j], 4 * i), table));
        const __m512i sd = fp4_scale_dwords(p, n, c.k0 / FP4_BLOCK);
        for (int b = 0; b < c.kcur / FP4_BLOCK; ++b)
          _mm512_store_ps(c.scales + (s * (KC / FP4_BLOCK) + b) * NR + 16 * g, e8m0_lanes(sd, b));
      } else {
        const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
        for (int64_t c0 = 0; c0 < c.kcur; c0 += 32) {
          load_transposed(p, n, 2 * (c.k0 + c0), int(2 * std::min<int64_t>(32, c.kcur - c0)), 2 * KC, r);
          for (int j = 0; j < 16 && 2 * j < c.kcur - c0; ++j) {
            _mm512_store_ps(panel + (c0 + 2 * j) * NR, _mm512_castsi512_ps(_mm512_slli_epi32(r[j], 16)));
            _mm512_store_ps(panel + (c0 + 2 * j + 1) * NR, _mm512_castsi512_ps(_mm512_and_si512(r[j], high)));
          }
        }
      }
    }
}

// pack_x_portable for whole tiles: 16 columns of up to 12 rows at a time through the dword transpose.
AVX512 void pack_x_avx512(const Problem& p, const Chunk& c) {
  const __m512 factor = _mm512_set1_ps(x_factor(p.fmt));
  __m512i r[16];
  for (int64_t m = c.m0; m < c.m1; m += MR) {
    const int rows = int(std::min<int64_t>(MR, c.m1 - m));
    float* out = c.xpack + (m - c.m0) / MR * KC * MR;
    for (int64_t k = 0; k < c.kcur; k += 16) {
      const int cols = int(std::min<int64_t>(16, c.kcur - k));
      const __mmask16 in_mask = __mmask16((1u << cols) - 1);
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_maskz_loadu_epi32(in_mask, p.x + (m + i) * p.K + c.k0 + k) : _mm512_setzero_si512();
      transpose16(r);
      for (int j = 0; j < cols; ++j)
        _mm512_mask_storeu_ps(out + (k + j) * MR, __mmask16((1u << MR) - 1), _mm512_mul_ps(_mm512_castsi512_ps(r[j]), factor));
    }
  }
}

// The chains of R activation rows against one 32-row strip over one chunk.
template <int R>
AVX512 void micro_avx512(const Problem& p, const Chunk& c, int64_t m0, int64_t strip) {
  const float* panel = c.panel + strip * KC * NR;
  const int64_t nbase = c.n0 + strip * NR;
  __mmask16 mask[2];
  for (int v = 0; v < 2; ++v)
    mask[v] = __mmask16((1u << std::min<int64_t>(16, std::max<int64_t>(0, p.N - nbase - 16 * v))) - 1);
  const float* x = c.x_tile(m0);
  float* y = p.y + m0 * p.N + nbase;
  const int64_t blen = p.fmt == FP4 ? FP4_BLOCK : c.kcur;
  __m512 part[R][2];
  for (int64_t b0 = 0; b0 < c.kcur; b0 += blen) {
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < 2; ++v)  // bf16: one chain over all of K, carried in y between chunks
        part[i][v] = p.fmt == BF16 && c.k0 > 0 ? _mm512_maskz_loadu_ps(mask[v], y + i * p.N + 16 * v)
                                                : _mm512_setzero_ps();
    for (int64_t k = b0; k < b0 + blen; ++k) {
      const __m512 w0 = _mm512_load_ps(panel + k * NR), w1 = _mm512_load_ps(panel + k * NR + 16);
#pragma GCC unroll 12
      for (int i = 0; i < R; ++i) {
        const __m512 xb = _mm512_set1_ps(x[k * MR + i]);
        part[i][0] = _mm512_fmadd_ps(xb, w0, part[i][0]);
        part[i][1] = _mm512_fmadd_ps(xb, w1, part[i][1]);
      }
    }
    if (p.fmt == BF16) {
#pragma GCC unroll 12
      for (int i = 0; i < R; ++i)
        for (int v = 0; v < 2; ++v) _mm512_mask_storeu_ps(y + i * p.N + 16 * v, mask[v], part[i][v]);
      continue;
    }
    __m512 sw[2];
    for (int v = 0; v < 2; ++v)
      sw[v] = p.fmt == FP8 ? _mm512_set1_ps(fp8_weight_scale(p, nbase, c.k0))
                           : _mm512_load_ps(c.scales + (strip * (KC / FP4_BLOCK) + b0 / FP4_BLOCK) * NR + 16 * v);
    const bool first = c.k0 == 0 && b0 == 0;
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
      const __m512 sx = _mm512_set1_ps(p.act_scale(m0 + i, c.k0 + b0));
      for (int v = 0; v < 2; ++v) {
        const __m512 a = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[v], y + i * p.N + 16 * v);
        _mm512_mask_storeu_ps(y + i * p.N + 16 * v, mask[v], _mm512_fmadd_ps(part[i][v], _mm512_mul_ps(sx, sw[v]), a));
      }
    }
  }
}

AVX512 void micro_avx512_rows(const Problem& p, const Chunk& c, int64_t m0, int rows_m, int64_t strip) {
  switch (rows_m) {
    case 1: return micro_avx512<1>(p, c, m0, strip);
    case 2: return micro_avx512<2>(p, c, m0, strip);
    case 3: return micro_avx512<3>(p, c, m0, strip);
    case 4: return micro_avx512<4>(p, c, m0, strip);
    case 5: return micro_avx512<5>(p, c, m0, strip);
    case 6: return micro_avx512<6>(p, c, m0, strip);
    case 7: return micro_avx512<7>(p, c, m0, strip);
    case 8: return micro_avx512<8>(p, c, m0, strip);
    case 9: return micro_avx512<9>(p, c, m0, strip);
    case 10: return micro_avx512<10>(p, c, m0, strip);
    case 11: return micro_avx512<11>(p, c, m0, strip);
    default: return micro_avx512<12>(p, c, m0, strip);
  }
}

// --- fused schedule (decode) --------------------------------------------------------------------------------

// R activation rows against G groups of 16 weight rows from n0, all of K. The bytes of 64 columns (FP8: 64 k,
// FP4: 128 k, bf16: 32 k) of each group are transposed into a small buffer, then each dword column is decoded
// right before its FMAs; partial sums and accumulators stay in registers.
template <Fmt F, int R, int G>
AVX512 inline void fused_fma(const float* xk, int64_t ldk, int64_t k, const __m512 (&w)[G], __m512 (&part)[R][G]) {
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    const __m512 xb = _mm512_set1_ps(xk[k * ldk + i]);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) part[i][g] = _mm512_fmadd_ps(xb, w[g], part[i][g]);
  }
}

// y += part * (s_x * s_w) (y = ... for the first block), part = 0: the end of the block holding column k.
template <int R, int G>
AVX512 inline void fused_end_block(const Problem& p, int64_t n0, int64_t m0, int64_t k, bool first,
                                   const __m512 (&sw)[G], __m512 (&part)[R][G]) {
  __mmask16 mask[G];
  for (int g = 0; g < G; ++g)
    mask[g] = __mmask16((1u << std::min<int64_t>(16, std::max<int64_t>(0, p.N - n0 - 16 * g))) - 1);
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    const __m512 sx = _mm512_set1_ps(p.act_scale(m0 + i, k));
    float* y = p.y + (m0 + i) * p.N + n0;
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const __m512 acc = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[g], y + 16 * g);
      _mm512_mask_storeu_ps(y + 16 * g, mask[g], _mm512_fmadd_ps(part[i][g], _mm512_mul_ps(sx, sw[g]), acc));
      part[i][g] = _mm512_setzero_ps();
    }
  }
}

// Activation rows [m0, m0 + R) against G groups of 16 weight rows from n0, all of K. The bytes of 64 columns
// (FP8: 64 k, FP4: 128 k, bf16: 32 k) of each group are transposed into a small buffer, then each dword
// column is decoded right before its FMAs; the partial sums stay in registers. xk: the activations packed
// as [K][ldk] (broadcasts read consecutive addresses), FP8 ones pre-multiplied by 2^8.
template <Fmt F, int R, int G>
AVX512 void fused_avx512(const Problem& p, const float* xk, int64_t ldk, int64_t n0, int64_t m0) {
  constexpr int per = F == FP8 ? 4 : F == FP4 ? 8 : 2;  // k per dword column
  constexpr int64_t span = 16 * per;                     // k per 64-byte row segment
  constexpr int64_t ahead = 2 * 64;                      // prefetch distance along each row (measured best)
  alignas(64) __m512i tb[G][16];
  __m512 part[R][G], w[G], w1[G], sw[G];
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g) part[i][g] = _mm512_setzero_ps();
  const __m512 table = _mm512_load_ps(fp4_values);
  const __m512i lo = fp8_pair_index(0), hi = fp8_pair_index(1);
  const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  xk += m0;
  for (int64_t k0 = 0; k0 < p.K; k0 += span) {
    const int64_t kvalid = std::min<int64_t>(span, p.K - k0);
    const int bytes = int(F == FP8 ? kvalid : F == FP4 ? kvalid / 2 : 2 * kvalid);
    const int64_t col = F == FP8 ? k0 : F == FP4 ? k0 / 2 : 2 * k0;
    // Short rows (V4's K = 1024) make tasks short: start the next task's rows (the next rows in memory)
    // on their way to L2, one row per segment.
    const int64_t next = n0 + 16 * G + k0 / span;
    if (k0 / span < 16 && next < p.N) {
      _mm_prefetch(reinterpret_cast<const char*>(p.w + next * p.row_bytes()), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(p.w + next * p.row_bytes() + 64), _MM_HINT_T1);
    }
    __m512i scale_bytes[G];
    for (int g = 0; g < G; ++g) {
      __m512i r[16];
      load_transposed(p, n0 + 16 * g, col, bytes, ahead, r);
      for (int j = 0; j < 16; ++j) _mm512_store_si512(&tb[g][j], r[j]);
      if constexpr (F == FP4) scale_bytes[g] = fp4_scale_dwords(p, n0 + 16 * g, k0 / FP4_BLOCK);
    }
    const int columns = int((kvalid + per - 1) / per);
    for (int j = 0; j < columns; ++j) {
      const int64_t kj = k0 + int64_t(j) * per;
      const int nk = int(std::min<int64_t>(per, p.K - kj));
      if constexpr (F == FP8) {
        for (int h = 0; h < 2 && 2 * h < nk; ++h) {
          for (int g = 0; g < G; ++g) fp8_decode_pair(_mm512_load_si512(&tb[g][j]), h ? hi : lo, w[g], w1[g]);
          fused_fma<F, R, G>(xk, ldk, kj + 2 * h, w, part);
          if (2 * h + 1 < nk) fused_fma<F, R, G>(xk, ldk, kj + 2 * h + 1, w1, part);
        }
      } else if constexpr (F == FP4) {
        for (int i = 0; i < 8; ++i) {  // K is a multiple of 32: every column is whole
          for (int g = 0; g < G; ++g)
            w[g] = _mm512_permutexvar_ps(_mm512_srli_epi32(_mm512_load_si512(&tb[g][j]), 4 * i), table);
          fused_fma<F, R, G>(xk, ldk, kj + i, w, part);
        }
        if (j % 4 == 3) {  // a 32-k block ends every four columns
          for (int g = 0; g < G; ++g) sw[g] = e8m0_lanes(scale_bytes[g], j / 4);
          fused_end_block<R, G>(p, n0, m0, kj, kj < FP4_BLOCK, sw, part);
        }
      } else {
        for (int g = 0; g < G; ++g) {
          const __m512i d = _mm512_load_si512(&tb[g][j]);
          w[g] = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
          w1[g] = _mm512_castsi512_ps(_mm512_and_si512(d, high));
        }
        fused_fma<F, R, G>(xk, ldk, kj, w, part);
        if (nk > 1) fused_fma<F, R, G>(xk, ldk, kj + 1, w1, part);
      }
    }
    if constexpr (F == FP8) {
      if ((k0 + span) % FP8_BLOCK == 0 || k0 + span >= p.K) {
        for (int g = 0; g < G; ++g) sw[g] = _mm512_set1_ps(fp8_weight_scale(p, std::min(n0 + 16 * g, p.N - 1), k0));
        fused_end_block<R, G>(p, n0, m0, k0, k0 < FP8_BLOCK, sw, part);
      }
    }
  }
  if constexpr (F == BF16) {
    for (int i = 0; i < R; ++i)
      for (int g = 0; g < G; ++g) {
        const int64_t n = n0 + 16 * g;
        const __mmask16 mask = __mmask16((1u << std::min<int64_t>(16, std::max<int64_t>(0, p.N - n))) - 1);
        _mm512_mask_storeu_ps(p.y + (m0 + i) * p.N + n, mask, part[i][g]);
      }
  }
}

// Groups of 16 weight rows per fused task. One group (16 rows, 16 row streams) reads memory best; FP4 with
// one activation row needs two for enough independent FMA chains.
constexpr int fused_groups(Fmt f, int64_t m) { return f == FP4 && m == 1 ? 2 : 1; }

// All activation rows against one fused task's weight rows, in tiles of at most FUSED_TILE rows.
template <Fmt F>
AVX512 void fused_task(const Problem& p, const float* xk, int64_t n0) {
  constexpr int G1 = fused_groups(F, 1), G = fused_groups(F, 2);
  for (int64_t m0 = 0; m0 < p.M; m0 += FUSED_TILE) {
    switch (std::min<int64_t>(FUSED_TILE, p.M - m0)) {
      case 1: fused_avx512<F, 1, G1>(p, xk, p.M, n0, m0); break;
      case 2: fused_avx512<F, 2, G>(p, xk, p.M, n0, m0); break;
      case 3: fused_avx512<F, 3, G>(p, xk, p.M, n0, m0); break;
      case 4: fused_avx512<F, 4, G>(p, xk, p.M, n0, m0); break;
      case 5: fused_avx512<F, 5, G>(p, xk, p.M, n0, m0); break;
      case 6: fused_avx512<F, 6, G>(p, xk, p.M, n0, m0); break;
      case 7: fused_avx512<F, 7, G>(p, xk, p.M, n0, m0); break;
      case 8: fused_avx512<F, 8, G>(p, xk, p.M, n0, m0); break;
      case 9: fused_avx512<F, 9, G>(p, xk, p.M, n0, m0); break;
      case 10: fused_avx512<F, 10, G>(p, xk, p.M, n0, m0); break;
      case 11: fused_avx512<F, 11, G>(p, xk, p.M, n0, m0); break;
      case 12: fused_avx512<F, 12, G>(p, xk, p.M, n0, m0); break;
      case 13: fused_avx512<F, 13, G>(p, xk, p.M, n0, m0); break;
      case 14: fused_avx512<F, 14, G>(p, xk, p.M, n0, m0); break;
      case 15: fused_avx512<F, 15, G>(p, xk, p.M, n0, m0); break;
      default: fused_avx512<F, 16, G>(p, xk, p.M, n0, m0); break;
    }
  }
}

AVX512 void run_fused(const Problem& p) {
  // Activations packed as [K][M] (and FP8's pre-multiplied by 2^8): at most FUSED_MAX_M rows.
  std::vector<float> xk(p.M * p.K);
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t k = 0; k < p.K; ++k) xk[k * p.M + m] = p.x[m * p.K + k] * x_factor(p.fmt);
  const int64_t rows = 16 * fused_groups(p.fmt, p.M);
  at::parallel_for(0, (p.N + rows - 1) / rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      if (p.fmt == FP8) fused_task<FP8>(p, xk.data(), t * rows);
      else if (p.fmt == FP4) fused_task<FP4>(p, xk.data(), t * rows);
      else fused_task<BF16>(p, xk.data(), t * rows);
    }
  });
}
#endif

// One panel task: weight rows [n0, n0 + rows) against activation rows [m0, m1), all of K.
void panel_task(const Problem& p, bool avx512, int64_t n0, int64_t rows, int64_t m0, int64_t m1) {
  const int64_t strips = (rows + NR - 1) / NR, tiles = (m1 - m0 + MR - 1) / MR;
  float* buf = scratch.get(strips * NR * (KC + KC / FP4_BLOCK) + tiles * MR * KC);
  Chunk c{buf, buf + strips * NR * KC, buf + strips * NR * (KC + KC / FP4_BLOCK), n0, rows, m0, m1, 0, 0};
  for (c.k0 = 0; c.k0 < p.K; c.k0 += KC) {
    c.kcur = std::min<int64_t>(KC, p.K - c.k0);
#if DSV4_X86
    if (avx512) {
      fill_avx512(p, c);
      pack_x_avx512(p, c);
      // Strips outer: a strip's panel (16 KB) stays in L1 while the activation tiles stream past it.
      for (int64_t s = 0; s < strips; ++s)
        for (int64_t m = m0; m < m1; m += MR) micro_avx512_rows(p, c, m, int(std::min<int64_t>(MR, m1 - m)), s);
      continue;
    }
#endif
    fill_portable(p, c);
    if (p.fmt == FP4) fill_fp4_scales(p, c);
    pack_x_portable(p, c);
    for (int64_t s = 0; s < strips; ++s)
      for (int64_t m = m0; m < m1; m += MR) micro_portable(p, c, m, int(std::min<int64_t>(MR, m1 - m)), s);
  }
}

void run(const Problem& p, bool avx512) {
#if DSV4_X86
  if (avx512 && p.M <= FUSED_MAX_M) {
    run_fused(p);
    return;
  }
#endif
  // Weight rows per task: a multiple of 32 (strips never straddle tasks); 512 rows reuse each packed
  // activation tile across 16 strips, fewer leave enough tasks to balance the threads. Activation rows per
  // task: a multiple of MR. (The arithmetic does not depend on either.)
  const int64_t mc = 192, tm = (p.M + mc - 1) / mc;
  int64_t nc = 512;
  while (nc > 64 && tm * ((p.N + nc - 1) / nc) < 4 * at::get_num_threads()) nc /= 2;
  const int64_t tn = (p.N + nc - 1) / nc;
  at::parallel_for(0, tn * tm, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n0 = t / tm * nc, m0 = t % tm * mc;
      panel_task(p, avx512, n0, std::min(nc, p.N - n0), m0, std::min(m0 + mc, p.M));
    }
  });
}

}  // namespace

extern "C" {

// 2: the AVX-512 (F, BW, DQ, VL, VBMI) kernels run on this CPU; 1: the portable kernel only.
int dsv4_gemm_best_isa() { return cpu_has_avx512() ? 2 : 1; }

// fmt: 0 FP8, 1 FP4, 2 bf16. isa: 2 AVX-512 (if the CPU has it), 1 portable. Contiguous tensors; xs may be
// null (activation scales 1).
void dsv4_gemm(int fmt, int isa, const float* x, const float* xs, const void* w, const uint8_t* ws, float* y,
               int64_t M, int64_t N, int64_t K) {
  const Problem p{x, xs, static_cast<const uint8_t*>(w), ws, y, M, N, K, static_cast<Fmt>(fmt)};
  run(p, isa == 2 && cpu_has_avx512());
}
}
