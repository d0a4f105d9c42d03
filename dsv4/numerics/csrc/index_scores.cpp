// The lightning indexer's scores straight from the paged key cache (spec §5 step 7):
//   I[q, e] = sum over heads h, in increasing h, of w[q, h] * ReLU(q_h . k_e)
// for every key e < usable[q] of the query's sequence (at most its stored keys), and -inf for e in
// [usable[q], width). It is the one
// dense [queries x entries] product V4 needs; a library GEMM would form every head's [queries x entries]
// product in memory first, read every key of every sequence through a separate call, and score the future
// entries of a prefill that the causal mask then discards. Here each sequence's keys are read once per step
// where they lie in the pool (a block table per sequence), every head's product stays in registers, and tiles
// past a query's last usable entry are skipped.
//
// Keys are read in their stored form: fp32, bf16, or FP4 (e2m1 codes two per byte, low nibble first, with one
// e8m0 scale per 32 values: the simulated modes' compact keys, decoded exactly in the kernel).
//
// Each score is one fixed sequence of IEEE operations whatever the batch, the tiling or the instruction set,
// so a decode query's scores equal its prefill row's bit for bit: per head the chain d = +0, d = fma(q[c],
// k[c], d) in increasing c; then, with round_bf16 (the bf16 numerics: a bf16 einsum, ReLU, multiply and sum),
// d = bf16(d); p = bf16(max(d, 0) * w[h]); and s = +0, s = s + p in increasing h, s = bf16(s) at the end;
// without it the same chain with no rounding. The SIMD lanes hold 16 keys, so key rows are transposed in
// registers; the portable path computes the same chains one key at a time.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "x86.h"

namespace {

constexpr int TILE = 32;       // keys per task and per register tile (two 16-lane vectors)
constexpr int HEAD_GROUP = 8;  // heads whose chains run together (8 x 2 accumulators in registers)
constexpr size_t QUERY_BLOCK = 128;  // queries of one sequence per pass over its keys

enum KeyFmt { F32 = 0, BF16 = 1, FP4 = 2 };
constexpr int FP4_BLOCK = 32;
constexpr float FP4_VALUES[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                  -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

struct Problem {
  const float* q;           // [Q, H, C] fp32
  const float* w;           // [Q, H] fp32
  const int64_t* member;    // [Q] whose keys each query scores
  const int64_t* usable;    // [Q] keys [0, usable) scored
  const int64_t* base;      // [S] address of each member's key rows
  const int64_t* scale_base;  // [S] address of each member's FP4 scale rows (C / 32 bytes apart), FP4 only
  const int64_t* tables;    // [S, B] each member's blocks
  const int64_t* per_block; // [S] keys per block, per member
  const int64_t* count;     // [S] keys stored per member: none past them is read
  int64_t Q, H, C, S, B, width;
  KeyFmt fmt;
  bool round_bf16;
  float* out;               // [Q, width] fp32
};

// The key rows of one member: row e lies in block tables[e / per_block] at offset e % per_block.
struct Keys {
  const uint8_t* base;
  const uint8_t* scales;  // FP4 only
  const int64_t* table;
  int64_t per_block, row_bytes, scale_bytes;
  int64_t slot(int64_t e) const { return table[e / per_block] * per_block + e % per_block; }
  const uint8_t* row(int64_t e) const { return base + slot(e) * row_bytes; }
  const uint8_t* scale_row(int64_t e) const { return scales + slot(e) * scale_bytes; }
};

Keys keys_of(const Problem& p, int64_t m) {
  const int64_t row_bytes = p.fmt == F32 ? 4 * p.C : p.fmt == BF16 ? 2 * p.C : p.C / 2;
  return {reinterpret_cast<const uint8_t*>(p.base[m]), reinterpret_cast<const uint8_t*>(p.scale_base[m]),
          p.tables + m * p.B, p.per_block[m], row_bytes, p.C / FP4_BLOCK};
}

inline float e8m0(uint8_t s) {
  return s == 255 ? std::numeric_limits<float>::quiet_NaN() : std::ldexp(1.0f, int(s) - 127);
}

// Key e's values, exactly (FP4 values times their power-of-two scale are exact in fp32).
void decode_row(const Problem& p, const Keys& keys, int64_t e, float* out) {
  const uint8_t* row = keys.row(e);
  for (int64_t c = 0; c < p.C; ++c) {
    if (p.fmt == F32) {
      out[c] = reinterpret_cast<const float*>(row)[c];
    } else if (p.fmt == BF16) {
      const uint32_t u = uint32_t(reinterpret_cast<const uint16_t*>(row)[c]) << 16;
      std::memcpy(out + c, &u, 4);
    } else {
      const uint8_t code = (row[c / 2] >> (4 * (c % 2))) & 0xF;
      out[c] = FP4_VALUES[code] * e8m0(keys.scale_row(e)[c / FP4_BLOCK]);
    }
  }
}

// Ask for the rows of a tile ahead of their use.
void prefetch_tile(const Keys& keys, int64_t e0, int64_t count) {
  for (int64_t e = e0; e < std::min(e0 + TILE, count); ++e) {
    const uint8_t* row = keys.row(e);
    for (int64_t b = 0; b < keys.row_bytes; b += 64) __builtin_prefetch(row + b);
    if (keys.scales != nullptr) __builtin_prefetch(keys.scale_row(e));
  }
}

inline float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;  // to nearest, ties to even (finite inputs)
  std::memcpy(&x, &u, 4);
  return x;
}

// One query against keys [e0, e1) of its member (all < its usable count), one key at a time.
void score_portable(const Problem& p, const Keys& keys, int64_t qi, int64_t e0, int64_t e1) {
  const float* q = p.q + qi * p.H * p.C;
  const float* w = p.w + qi * p.H;
  std::vector<float> k(p.C);
  for (int64_t e = e0; e < e1; ++e) {
    decode_row(p, keys, e, k.data());
    float s = 0.0f;
    for (int64_t h = 0; h < p.H; ++h) {
      float d = 0.0f;
      for (int64_t c = 0; c < p.C; ++c) d = std::fma(q[h * p.C + c], k[c], d);
      if (p.round_bf16) d = round_bf16(d);
      float prod = std::max(d, 0.0f) * w[h];
      if (p.round_bf16) prod = round_bf16(prod);
      s = s + prod;
    }
    p.out[qi * p.width + e] = p.round_bf16 ? round_bf16(s) : s;
  }
}

#if DSV4_X86
AVX512 inline __m512 round_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000u))));
}

// One FP4 key row decoded to fp32, 32 values (one scale block, 16 bytes) at a time.
AVX512 void decode_fp4_avx512(const Problem& p, const Keys& keys, int64_t e, float* out) {
  const __m512 table = _mm512_loadu_ps(FP4_VALUES);
  const __m512i even = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i odd = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const uint8_t* row = keys.row(e);
  const uint8_t* scales = keys.scale_row(e);
  for (int64_t b = 0; b < p.C / FP4_BLOCK; ++b) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * b)));
    const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF)), table);
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
    const __m512 scale = _mm512_set1_ps(e8m0(scales[b]));
    _mm512_storeu_ps(out + 32 * b, _mm512_mul_ps(_mm512_permutex2var_ps(lo, even, hi), scale));
    _mm512_storeu_ps(out + 32 * b + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, odd, hi), scale));
  }
}

// Keys [e0, e0 + 32) of one member, transposed: kt[c * 32 + j] = k_{e0 + j}[c]; keys at or past `count` are 0.
// FP4 rows are decoded into `rows` ([16, C] fp32) first.
AVX512 void transpose_tile(const Problem& p, const Keys& keys, int64_t e0, int64_t count, float* kt, float* rows) {
  for (int half = 0; half < 2; ++half) {
    const uint8_t* src[16];
    for (int j = 0; j < 16; ++j) {
      const int64_t e = e0 + 16 * half + j;
      src[j] = nullptr;
      if (e < count && p.fmt == FP4) {
        decode_fp4_avx512(p, keys, e, rows + j * p.C);
        src[j] = reinterpret_cast<const uint8_t*>(rows + j * p.C);
      } else if (e < count) {
        src[j] = keys.row(e);
      }
    }
    for (int64_t c0 = 0; c0 < p.C; c0 += 16) {
      const int cols = int(std::min<int64_t>(16, p.C - c0));
      const __mmask16 mask = __mmask16((1u << cols) - 1);
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        if (src[j] == nullptr) {
          r[j] = _mm512_setzero_si512();
        } else if (p.fmt == BF16) {
          const __m256i h = _mm256_maskz_loadu_epi16(mask, src[j] + 2 * c0);
          r[j] = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
        } else {
          r[j] = _mm512_maskz_loadu_epi32(mask, src[j] + 4 * c0);
        }
      }
      transpose16(r);
      for (int c = 0; c < cols; ++c) _mm512_storeu_si512(kt + (c0 + c) * TILE + 16 * half, r[c]);
    }
  }
}

// Heads [h0, h0 + G) of one query against a transposed tile; adds their terms to s (two vectors of 16 keys).
template <int G>
AVX512 inline void score_heads(const Problem& p, const float* q, const float* w, const float* kt, int64_t h0,
                               __m512 (&s)[2]) {
  __m512 acc[G][2];
  for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
  const float* qh = q + h0 * p.C;
  for (int64_t c = 0; c < p.C; ++c) {
    const __m512 k0 = _mm512_loadu_ps(kt + c * TILE), k1 = _mm512_loadu_ps(kt + c * TILE + 16);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const __m512 b = _mm512_set1_ps(qh[g * p.C + c]);
      acc[g][0] = _mm512_fmadd_ps(b, k0, acc[g][0]);
      acc[g][1] = _mm512_fmadd_ps(b, k1, acc[g][1]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 wh = _mm512_set1_ps(w[h0 + g]);
    for (int v = 0; v < 2; ++v) {
      __m512 d = p.round_bf16 ? round_bf16(acc[g][v]) : acc[g][v];
      __m512 prod = _mm512_mul_ps(_mm512_max_ps(d, _mm512_setzero_ps()), wh);
      if (p.round_bf16) prod = round_bf16(prod);
      s[v] = _mm512_add_ps(s[v], prod);
    }
  }
}

// One query against a transposed tile of keys [e0, e1), e1 - e0 <= 32.
AVX512 void score_avx512(const Problem& p, const float* kt, int64_t qi, int64_t e0, int64_t e1) {
  const float* q = p.q + qi * p.H * p.C;
  const float* w = p.w + qi * p.H;
  __m512 s[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t h = 0;
  for (; h + HEAD_GROUP <= p.H; h += HEAD_GROUP) score_heads<HEAD_GROUP>(p, q, w, kt, h, s);
  for (; h < p.H; ++h) score_heads<1>(p, q, w, kt, h, s);
  float* out = p.out + qi * p.width + e0;
  const int n = int(e1 - e0);
  for (int v = 0; v < 2 && 16 * v < n; ++v) {
    const __m512 r = p.round_bf16 ? round_bf16(s[v]) : s[v];
    _mm512_mask_storeu_ps(out + 16 * v, __mmask16((1u << std::min(16, n - 16 * v)) - 1), r);
  }
}
#endif

void run(const Problem& p, bool avx512) {
  // Each query's usable keys (never past its member's stored ones) and the queries of each member.
  std::vector<int64_t> usable(p.Q);
  std::vector<std::vector<int64_t>> queries(p.S);
  size_t most = 0;
  for (int64_t qi = 0; qi < p.Q; ++qi) {
    const int64_t m = p.member[qi];
    usable[qi] = std::clamp<int64_t>(p.usable[qi], 0, std::min(p.count[m], p.width));
    queries[m].push_back(qi);
    most = std::max(most, queries[m].size());
    float* row = p.out + qi * p.width;
    std::fill(row + usable[qi], row + p.width, -std::numeric_limits<float>::infinity());
  }
  // Queries in blocks of QUERY_BLOCK per member, so that a block's queries stay in the core's L2 while every
  // tile of keys passes by (a tile is transposed once per block: for a decode, once).
  for (size_t q0 = 0; q0 < most; q0 += QUERY_BLOCK) {
    std::vector<std::pair<int64_t, int64_t>> tasks;  // (member, first key of the tile)
    std::vector<int64_t> reach(p.S, 0);
    for (int64_t m = 0; m < p.S; ++m) {
      for (size_t i = q0; i < std::min(queries[m].size(), q0 + QUERY_BLOCK); ++i)
        reach[m] = std::max(reach[m], usable[queries[m][i]]);
      for (int64_t e0 = 0; e0 < reach[m]; e0 += TILE) tasks.emplace_back(m, e0);
    }
    // Thread i takes tasks i, i + T, i + 2T, ...: in a prefill the first tiles serve every query and the last
    // few, so contiguous ranges would not balance; and a thread knows its next tile, whose keys it prefetches
    // while it computes (one core's demand misses alone reach a fraction of the memory bandwidth).
    const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), int64_t(tasks.size())));
    at::parallel_for(0, n_threads, 1, [&](int64_t b, int64_t e) {
      std::vector<float> kt(avx512 ? p.C * TILE : 0), rows(avx512 && p.fmt == FP4 ? 16 * p.C : 0);
      for (int64_t i = b; i < e; ++i)
        for (size_t t = size_t(i); t < tasks.size(); t += size_t(n_threads)) {
          const auto [m, e0] = tasks[t];
          const Keys keys = keys_of(p, m);
          if (t + n_threads < tasks.size()) {
            const auto [next_m, next_e0] = tasks[t + n_threads];
            prefetch_tile(keys_of(p, next_m), next_e0, reach[next_m]);
          }
#if DSV4_X86
          if (avx512) transpose_tile(p, keys, e0, reach[m], kt.data(), rows.data());
#endif
          const auto& mine = queries[m];
          for (size_t j = q0; j < std::min(mine.size(), q0 + QUERY_BLOCK); ++j) {
            const int64_t qi = mine[j], e1 = std::min(e0 + TILE, usable[qi]);
            if (e1 <= e0) continue;
#if DSV4_X86
            if (avx512) {
              score_avx512(p, kt.data(), qi, e0, e1);
              continue;
            }
#endif
            score_portable(p, keys, qi, e0, e1);
          }
        }
    });
  }
}

}  // namespace

extern "C" {

// Scores of Q queries (q [Q, H, C], w [Q, H], fp32) against their members' paged keys (key_fmt 0 fp32, 1
// bf16, 2 FP4 with scale rows at scale_base), written to out [Q, width] (fp32; -inf from min(usable[q],
// count[member[q]]) on). isa: 2 AVX-512 where the CPU has it, 1 portable. FP4 needs C % 32 == 0. Returns
// -1 (writing nothing) if a member's first count keys do not lie in its stored_rows rows through its table.
int dsv4_index_scores(int isa, int key_fmt, int round_bf16, const float* q, const float* w, const int64_t* member,
                      const int64_t* usable, const int64_t* base, const int64_t* scale_base, const int64_t* tables,
                      const int64_t* per_block, const int64_t* count, const int64_t* stored_rows, int64_t Q,
                      int64_t H, int64_t C, int64_t S, int64_t B, int64_t width, float* out) {
  for (int64_t m = 0; m < S; ++m) {
    if (count[m] <= 0) continue;
    const int64_t used = (count[m] + per_block[m] - 1) / per_block[m];
    if (used > B) return -1;
    for (int64_t b = 0; b < used; ++b) {
      const int64_t block = tables[m * B + b];
      if (block < 0 || (block + 1) * per_block[m] > stored_rows[m]) return -1;
    }
  }
  const Problem p{q, w, member, usable, base, scale_base, tables, per_block, count, Q, H, C, S, B, width,
                  static_cast<KeyFmt>(key_fmt), round_bf16 != 0, out};
  run(p, isa == 2 && cpu_has_avx512());
  return 0;
}
}
