// Y[M, N] = X[M, K] . W[N, K]^T with W in block-quantised form and X quantised per
// row and per 32 values to int8, for the small M of a decode step or a verified draft.
//
// Why this kernel: a decode step of a 4-bit model on two cores is bound by memory at
// one row, and by multiply-adds soon after. Each weight tile is unpacked once and then
// multiplied against every activation row with AVX-512 VNNI (vpdpbusd: 64 u8 x s8
// multiply-adds per instruction), so a pass over k rows costs little more than one
// until compute runs out. Weights sit in the unsigned operand (4-bit nibbles or 8-bit
// codes need no sign handling); activations are the broadcast signed operand.
//
// Weight format (packed by specdec/kernels/packing.py):
//   w[n, k] = D[sb] * sc[g] * u[n, k] - DM[sb] * m[g]
// with u the unsigned code (4, 6 or 8 bits), g the group of G (16 or 32) values along K
// and sb the super-block of S groups; D and DM are fp16; sc and m are int8 (absent
// when S == 1, then 1). Every GGUF type we read (Q4_K, Q4_1, Q6_K, Q8_0, Q5_0) maps
// onto this exactly. Where the offset is a fixed multiple of the scale (Q6_K, Q4_0,
// Q5_0, Q8_0, our int8: DM = offset * D and m = sc), w = D*sc*(u - offset) and the
// offset is taken off in integers: a group's sum starts at -offset * (the sum of the
// activation codes), a broadcast load, instead of a float multiply-add per row and
// group (measured: those float operations share the pipes of vpdpbusd; dropping the
// one per 16-value group made Q6_K tiles ~20 % faster). Columns are in tiles of 16; per tile and per 32 values of K the
// codes fill 256 bytes (4 bits: byte 4j+b of chunk i holds k = 8i+b in its low nibble
// and k = 8i+4+b in its high one, for column j), 384 bytes (6 bits: the low 4 bits as
// the 4-bit layout, then 128 bytes whose byte 4j+b of half i holds bits 4-5 of
// k = 16i+4t+b at bits 2t..2t+1, t = 0..3) or 512 bytes (8 bits: byte 4j+b of chunk s
// holds k = 4s+b). Step s of a chunk covers k = 4s..4s+3.
//
// Every row goes through the same float operations in the same order whatever M is,
// and integer sums are exact, so a row's result does not depend on the other rows:
// verifying k tokens gives bit-identical rows to k one-token passes. The portable
// path performs the same operations one lane at a time and matches bit for bit.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#include <omp.h>

#include "native.h"

namespace {

// Chunk-major: the rows of one 32-value chunk sit together, so a block of rows is one
// pointer plus constant offsets (8 row pointers had the compiler shuffling addresses
// through vector registers in the multiply-add loop).
struct Act {
    const int8_t* xq;   // [K/32][M][32]
    const float* da;    // [K/32][M]   scale of each 32 values
    const float* bs16;  // [K/16][M]   da * sum of the codes over each 16
    const float* bs32;  // [K/32][M]   da * sum of the codes over each 32
    const int32_t* is16;  // [K/16][M]   sum of the codes over each 16
    const int32_t* is32;  // [K/32][M]   sum of the codes over each 32
    int64_t M;
};

// -offset * the sums of the activation codes over each group of G values: where the
// integer sums of an offset weight start ([K/G][M]).
void offset_starts(const Act& a, int64_t K, int group, int offset, int32_t* out) {
    const int32_t* is = group == 16 ? a.is16 : a.is32;
    const int64_t n = K / group * a.M;
    for (int64_t i = 0; i < n; i++) out[i] = -offset * is[i];
}

float half_to_float(uint16_t h) {
    // exact conversion (the same value vcvtph2ps gives)
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// ---------------------------------------------------------------- activations
void quantise_rows(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* xq, float* da,
                   float* bs16, float* bs32, int32_t* is16, int32_t* is32) {
    const int64_t nc = K / 32;
    for (int64_t r = 0; r < M; r++) {
        const float* xr = x + r * ldx;
        for (int64_t c = 0; c < nc; c++) {
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = std::fmax(amax, std::fabs(xr[c * 32 + i]));
            float d = amax / 127.0f;
            float iscale = amax > 0.0f ? 127.0f / amax : 0.0f;
            int sum[2] = {0, 0};
            for (int i = 0; i < 32; i++) {
                int q = (int)std::nearbyint(xr[c * 32 + i] * iscale);
                q = q > 127 ? 127 : (q < -127 ? -127 : q);
                xq[(c * M + r) * 32 + i] = (int8_t)q;
                sum[i / 16] += q;
            }
            da[c * M + r] = d;
            bs16[2 * c * M + r] = d * (float)sum[0];
            bs16[(2 * c + 1) * M + r] = d * (float)sum[1];
            bs32[c * M + r] = d * (float)(sum[0] + sum[1]);
            is16[2 * c * M + r] = sum[0];
            is16[(2 * c + 1) * M + r] = sum[1];
            is32[c * M + r] = sum[0] + sum[1];
        }
    }
}

// The same operations 16 lanes at a time: the products, round-to-nearest-even (vcvtps2dq
// under the default rounding mode, as nearbyint), clamp and integer sums are those of
// quantise_rows, so the codes and scales are bit for bit the same. Measured: the scalar
// loop cost ~5 ns a value (nearbyint is a libm call without SSE4.1), which at 8 rows was
// a fifth of a 1.5B verification pass.
#define SPECDEC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
SPECDEC_AVX512 void quantise_rows_avx512(const float* x, int64_t M, int64_t K, int64_t ldx,
                                         int8_t* xq, float* da, float* bs16, float* bs32,
                                         int32_t* is16, int32_t* is32) {
    const int64_t nc = K / 32;
    const __m512i hi = _mm512_set1_epi32(127), lo = _mm512_set1_epi32(-127);
    for (int64_t r = 0; r < M; r++) {
        const float* xr = x + r * ldx;
        for (int64_t c = 0; c < nc; c++) {
            const __m512 a = _mm512_loadu_ps(xr + c * 32), b = _mm512_loadu_ps(xr + c * 32 + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            const float d = amax / 127.0f;
            const __m512 is = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, is));
            __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, is));
            qa = _mm512_max_epi32(_mm512_min_epi32(qa, hi), lo);
            qb = _mm512_max_epi32(_mm512_min_epi32(qb, hi), lo);
            _mm_storeu_si128((__m128i*)(xq + (c * M + r) * 32), _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128((__m128i*)(xq + (c * M + r) * 32 + 16), _mm512_cvtepi32_epi8(qb));
            const int sa = _mm512_reduce_add_epi32(qa), sb = _mm512_reduce_add_epi32(qb);
            da[c * M + r] = d;
            bs16[2 * c * M + r] = d * (float)sa;
            bs16[(2 * c + 1) * M + r] = d * (float)sb;
            bs32[c * M + r] = d * (float)(sa + sb);
            is16[2 * c * M + r] = sa;
            is16[(2 * c + 1) * M + r] = sb;
            is32[c * M + r] = sa + sb;
        }
    }
}

inline int64_t code_bytes_per_chunk(int bits) { return 64 * bits; }  // 32 values x 16 columns

// ---------------------------------------------------------------- portable path
// The same float operations as the AVX-512 path, lane by lane.
void tile_portable(const QWeight& w, int64_t t, const Act& a, const int32_t* starts, int64_t r0,
                   int64_t rows, float* y, int64_t ldy, const float* bias) {
    const int64_t K = w.K, nc = K / 32, G = w.group, S = w.sb_groups;
    const int64_t ng = K / G, nsb = ng / S, gpc = 32 / G, spg = 8 / gpc;
    const uint8_t* qs = w.qs + t * nc * code_bytes_per_chunk(w.bits);
    const uint16_t* dp = w.d + t * nsb * 16;
    const uint16_t* dmp = w.dm + t * nsb * 16;
    const int8_t* scp = w.sc ? w.sc + t * ng * 16 : nullptr;
    const int8_t* mp = w.m ? w.m + t * ng * 16 : scp;
    const int64_t n0 = t * 16;
    const int nvalid = (int)(w.N - n0 < 16 ? w.N - n0 : 16);
    for (int64_t r = r0; r < r0 + rows; r++) {
        float facc[16] = {0};
        for (int64_t c = 0; c < nc; c++) {
            uint8_t u[8][64];  // step s, byte 4j+b
            const uint8_t* p = qs + c * code_bytes_per_chunk(w.bits);
            if (w.bits == 8) {
                std::memcpy(u, p, 512);
            } else {
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 64; j++) {
                        uint8_t b = p[i * 64 + j];
                        u[2 * i][j] = b & 0x0F;
                        u[2 * i + 1][j] = b >> 4;
                    }
                if (w.bits == 6)
                    for (int s = 0; s < 8; s++)
                        for (int j = 0; j < 64; j++)
                            u[s][j] |= ((p[256 + (s / 4) * 64 + j] >> (2 * (s % 4))) & 3) << 4;
            }
            for (int64_t h = 0; h < gpc; h++) {
                const int64_t g = c * gpc + h, sb = g / S;
                const int8_t* xr = a.xq + (c * a.M + r) * 32;
                const float dar = a.da[c * a.M + r];
                const float bsr = G == 32 ? a.bs32[c * a.M + r] : a.bs16[g * a.M + r];
                for (int j = 0; j < 16; j++) {
                    float scale = half_to_float(dp[sb * 16 + j]);
                    float mn = half_to_float(dmp[sb * 16 + j]);
                    if (scp) {
                        scale = scale * (float)scp[g * 16 + j];
                        mn = mn * (float)mp[g * 16 + j];
                    }
                    int32_t acc = w.offset ? starts[g * a.M + r] : 0;
                    for (int64_t s = h * spg; s < (h + 1) * spg; s++)
                        for (int b = 0; b < 4; b++)
                            acc += (int32_t)u[s][4 * j + b] * (int32_t)xr[4 * s + b];
                    const float ts = scale * dar;
                    facc[j] = std::fma((float)acc, ts, facc[j]);
                    if (!w.offset) facc[j] = std::fma(-mn, bsr, facc[j]);
                }
            }
        }
        for (int j = 0; j < nvalid; j++)
            y[r * ldy + n0 + j] = bias ? facc[j] + bias[n0 + j] : facc[j];
    }
}

// ---------------------------------------------------------------- AVX-512 VNNI path
// How far ahead of the codes being unpacked to ask for them (bytes); 4-bit streams.
// 4096 rather than 1024: passes over 8-16 tokens 3-5 % faster on the 1.5B, no change at
// 1-4 (interleaved A/B, two runs).
constexpr int64_t PREFETCH_BYTES = 4096;

#define SPECDEC_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

// acc += u8 weights . the 4 signed bytes at x broadcast to every lane, as one instruction
// with an embedded broadcast operand: a separate vpbroadcastd per row and step would take
// a vector pipe slot that the multiply-adds need (measured: a row cost ~2x its vpdpbusd).
SPECDEC_VNNI static inline void dpbusd_bcast(__m512i& acc, __m512i w, const int8_t* x) {
    asm("vpdpbusd %[x]%{1to16%}, %[w], %[acc]"
        : [acc] "+v"(acc)
        : [w] "v"(w), [x] "m"(*(const int32_t*)x));
}

template <int RB, int BITS, int G, bool OFF>
SPECDEC_VNNI void tile_vnni(const QWeight& w, int64_t t, const Act& a, const int32_t* starts,
                            int64_t r0, float* y, int64_t ldy, const float* bias) {
    constexpr int gpc = 32 / G, spg = 8 / gpc;
    const int64_t K = w.K, nc = K / 32, S = w.sb_groups;
    const int64_t ng = K / G, nsb = ng / S;
    const uint8_t* qs = w.qs + t * nc * (64 * BITS);
    const uint16_t* dp = w.d + t * nsb * 16;
    const uint16_t* dmp = w.dm + t * nsb * 16;
    const int8_t* scp = w.sc ? w.sc + t * ng * 16 : nullptr;
    const int8_t* mp = w.m ? w.m + t * ng * 16 : scp;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    // Every loop over the block's rows is unrolled, so facc stays in registers (a rolled
    // epilogue had GCC storing all of facc to the stack at every chunk).
    __m512 facc[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; r++) facc[r] = _mm512_setzero_ps();
    const int64_t M = a.M;
    for (int64_t c = 0; c < nc; c++) {
        const int8_t* xc = a.xq + (c * M + r0) * 32;  // row r of the block at xc + 32 r
        const float* dac = a.da + c * M + r0;
        __m512i wv[8];
        const uint8_t* p = qs + c * (64 * BITS);
#pragma GCC unroll 8
        for (int i = 0; i < BITS; i++)  // the same distance in chunks whatever the width
            _mm_prefetch((const char*)(p + PREFETCH_BYTES * BITS / 4 + 64 * i), _MM_HINT_T0);
        if (BITS == 8) {
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) wv[i] = _mm512_loadu_si512((const void*)(p + 64 * i));
        } else {
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                __m512i b = _mm512_loadu_si512((const void*)(p + 64 * i));
                wv[2 * i] = _mm512_and_si512(b, low4);
                wv[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
            }
            if (BITS == 6) {  // bits 4-5: two bits per step per byte, moved to 0x30 and or-ed in
                const __m512i m30 = _mm512_set1_epi8(0x30);
#pragma GCC unroll 2
                for (int i = 0; i < 2; i++) {
                    const __m512i h = _mm512_loadu_si512((const void*)(p + 256 + 64 * i));
                    wv[4 * i] = _mm512_or_si512(
                        wv[4 * i], _mm512_and_si512(_mm512_slli_epi16(h, 4), m30));
                    wv[4 * i + 1] = _mm512_or_si512(
                        wv[4 * i + 1], _mm512_and_si512(_mm512_slli_epi16(h, 2), m30));
                    wv[4 * i + 2] = _mm512_or_si512(wv[4 * i + 2], _mm512_and_si512(h, m30));
                    wv[4 * i + 3] = _mm512_or_si512(
                        wv[4 * i + 3], _mm512_and_si512(_mm512_srli_epi16(h, 2), m30));
                }
            }
        }
#pragma GCC unroll 2
        for (int h = 0; h < gpc; h++) {
            const int64_t g = c * gpc + h, sb = S == 1 ? g : g / S;  // a division per chunk
            __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dp + sb * 16)));
            __m512 mn = _mm512_setzero_ps();
            if (!OFF) mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dmp + sb * 16)));
            if (scp) {
                scale = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                 _mm_loadu_si128((const __m128i*)(scp + g * 16)))));
                if (!OFF)
                    mn = _mm512_mul_ps(mn, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                               _mm_loadu_si128((const __m128i*)(mp + g * 16)))));
            }
            const float* bsg = G == 32 ? a.bs32 + c * M + r0 : a.bs16 + g * M + r0;
            const int32_t* stg = OFF ? starts + g * M + r0 : nullptr;
#pragma GCC unroll 8
            for (int r = 0; r < RB; r++) {
                const int8_t* xr = xc + 32 * r + h * 4 * spg;
                // two independent chains: integer sums are exact, so the split changes nothing
                __m512i acc0 = OFF ? _mm512_set1_epi32(stg[r]) : _mm512_setzero_si512();
                __m512i acc1 = _mm512_setzero_si512();
#pragma GCC unroll 4
                for (int s = 0; s < spg; s += 2) {
                    dpbusd_bcast(acc0, wv[h * spg + s], xr + 4 * s);
                    dpbusd_bcast(acc1, wv[h * spg + s + 1], xr + 4 * s + 4);
                }
                const __m512i acc = _mm512_add_epi32(acc0, acc1);
                const __m512 ts = _mm512_mul_ps(scale, _mm512_set1_ps(dac[r]));
                facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), ts, facc[r]);
                if (!OFF) facc[r] = _mm512_fnmadd_ps(mn, _mm512_set1_ps(bsg[r]), facc[r]);
            }
        }
    }
    const int64_t n0 = t * 16;
    const int64_t nvalid = w.N - n0 < 16 ? w.N - n0 : 16;
    const __mmask16 keep = (__mmask16)((1u << nvalid) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < RB; r++) {
        __m512 v = bias ? _mm512_add_ps(facc[r], b) : facc[r];
        _mm512_mask_storeu_ps(y + (r0 + r) * ldy + n0, keep, v);
    }
}

template <int BITS, int G, bool OFF>
void tile_rows_vnni(const QWeight& w, int64_t t, const Act& a, const int32_t* st, int64_t M,
                    float* y, int64_t ldy, const float* bias) {
    constexpr int RB = 8;
    int64_t r0 = 0;
    for (; r0 + RB <= M; r0 += RB) tile_vnni<RB, BITS, G, OFF>(w, t, a, st, r0, y, ldy, bias);
    switch (M - r0) {
        case 1: tile_vnni<1, BITS, G, OFF>(w, t, a, st, r0, y, ldy, bias); break;
        case 2: tile_vnni<2, BITS, G, OFF>(w, t, a, st, r0, y, ldy, bias); break;
        case 3: tile_vnni<3, BITS, G, OFF>(w, t, a, st, r0, y, ldy, bias); break;
        case 4: tile_vnni<4, BITS, G, OFF>(w, t, a, st, r0, y, ldy, bias); break;
        case 5: tile_vnni<5, BITS, G, OFF>(w, t, a, st, r0, y, ldy, bias); break;
        case 6: tile_vnni<6, BITS, G, OFF>(w, t, a, st, r0, y, ldy, bias); break;
        case 7: tile_vnni<7, BITS, G, OFF>(w, t, a, st, r0, y, ldy, bias); break;
        default: break;
    }
}

using TileRows = void (*)(const QWeight&, int64_t, const Act&, const int32_t*, int64_t, float*,
                          int64_t, const float*);

template <bool OFF>
TileRows pick_vnni_off(int bits, int group) {
    if (bits == 4) return group == 32 ? tile_rows_vnni<4, 32, OFF> : tile_rows_vnni<4, 16, OFF>;
    if (bits == 6) return group == 32 ? tile_rows_vnni<6, 32, OFF> : tile_rows_vnni<6, 16, OFF>;
    return group == 32 ? tile_rows_vnni<8, 32, OFF> : tile_rows_vnni<8, 16, OFF>;
}

TileRows pick_vnni(const QWeight& w) {
    return w.offset ? pick_vnni_off<true>(w.bits, w.group) : pick_vnni_off<false>(w.bits, w.group);
}

int vnni_usable() {
    static int usable = -1;
    if (usable < 0) {
        const char* env = std::getenv("SPECDEC_QGEMM_PORTABLE");
        __builtin_cpu_init();
        usable = !(env && env[0] == '1') && __builtin_cpu_supports("avx512f") &&
                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512vnni");
    }
    return usable;
}

}  // namespace

extern "C" {

// Which path runs here: 1 = AVX-512 VNNI, 0 = portable.
int specdec_qgemm_path(void) { return vnni_usable(); }

// Peak rate of vpdpbusd on this machine (64 u8 x s8 multiply-adds per instruction), with
// ``NF`` float multiply-adds beside every 8 of them: 8 independent integer chains (NF
// float ones), so latency never limits. The float operations are the kernel's per-group
// work (scale x activation scale, the sum, the offset); measured on Zen 4, each costs a
// vpdpbusd slot (8 + 2 per 8 runs at 8/10 of the peak, 8 + 3 at 8/11) while the
// int-to-float conversion rides another pipe. G multiply-adds per second, or 0 where the
// VNNI path cannot run.
extern "C++" {  // templates cannot have C linkage
template <int NF>
SPECDEC_VNNI static double vnni_mix_thread(int64_t iters) {
    __m512i acc[8];
    __m512 f[4];
    for (int i = 0; i < 8; i++) acc[i] = _mm512_set1_epi32(i);
    for (int i = 0; i < 4; i++) f[i] = _mm512_set1_ps(0.001f * (float)i);
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(0.0001f);
    for (int64_t it = 0; it < iters; it++) {
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
#pragma GCC unroll 4
        for (int i = 0; i < NF; i++) f[i] = _mm512_fmadd_ps(f[i], x, y);
    }
    __m512i sum = acc[0];
    for (int i = 1; i < 8; i++) sum = _mm512_add_epi32(sum, acc[i]);
    __m512 fs = f[0];
    for (int i = 1; i < 4; i++) fs = _mm512_add_ps(fs, f[i]);
    return (double)_mm512_reduce_add_epi32(sum) + (double)_mm512_reduce_add_ps(fs);
}

static double vnni_mix(int64_t iters, int float_ops_per_8) {
    switch (float_ops_per_8) {
        case 0: return vnni_mix_thread<0>(iters);
        case 1: return vnni_mix_thread<1>(iters);
        case 2: return vnni_mix_thread<2>(iters);
        case 3: return vnni_mix_thread<3>(iters);
        default: return vnni_mix_thread<4>(iters);
    }
}
}  // extern "C++"

double specdec_vnni_peak(int64_t iters, int nthreads, int float_ops_per_8) {
    if (!vnni_usable() || float_ops_per_8 < 0 || float_ops_per_8 > 4) return 0.0;
    volatile double sink = 0.0;
    vnni_mix(iters / 10, float_ops_per_8);  // warm the clocks up
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nthreads) reduction(+ : sink)
    sink += vnni_mix(iters, float_ops_per_8);
    const double dt = omp_get_wtime() - t0;
    return (double)iters * 8 * 64 * nthreads / dt / 1e9 + 0.0 * sink;
}

// Read bandwidth of this machine: each thread streams its own contiguous half of a buffer far
// larger than the caches, 64-byte loads summed into independent accumulators (what the
// weight stream of a decode step does, without the arithmetic). GB/s, the best of
// ``repeats`` passes; 0 if the buffer cannot be allocated. A torch ``sum`` read ~15 %
// slower than a decode step's own weight stream did, which made the floors loose.
SPECDEC_AVX512 static uint64_t stream_avx512(const uint8_t* p, int64_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i + 256 <= n; i += 256) {
        a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void*)(p + i)));
        a1 = _mm512_add_epi64(a1, _mm512_load_si512((const void*)(p + i + 64)));
        a2 = _mm512_add_epi64(a2, _mm512_load_si512((const void*)(p + i + 128)));
        a3 = _mm512_add_epi64(a3, _mm512_load_si512((const void*)(p + i + 192)));
    }
    return (uint64_t)_mm512_reduce_add_epi64(
        _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
}

static uint64_t stream_portable(const uint8_t* p, int64_t n) {
    uint64_t a[8] = {0};
    for (int64_t i = 0; i + 64 <= n; i += 64)
        for (int j = 0; j < 8; j++) {
            uint64_t v;
            std::memcpy(&v, p + i + 8 * j, 8);
            a[j] += v;
        }
    return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

double specdec_read_gbs(int64_t bytes, int nthreads, int repeats) {
    bytes &= ~(int64_t)(256 * 64 - 1);
    uint8_t* buf = (uint8_t*)std::aligned_alloc(64, bytes);
    if (!buf) return 0.0;
    const int avx512 = vnni_usable();
    const int64_t part = bytes / nthreads / 256 * 256;
#pragma omp parallel num_threads(nthreads)
    std::memset(buf + part * omp_get_thread_num(), 1, part);  // each thread's pages its own
    double best = 0.0;
    volatile uint64_t sink = 0;
    for (int r = 0; r < repeats + 1; r++) {  // the first pass warms up
        uint64_t total = 0;
        const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
        {
            const uint8_t* p = buf + part * omp_get_thread_num();
            total += avx512 ? stream_avx512(p, part) : stream_portable(p, part);
        }
        const double dt = omp_get_wtime() - t0;
        sink = sink + total;
        if (r > 0 && part * nthreads / dt / 1e9 > best) best = part * nthreads / dt / 1e9;
    }
    std::free(buf);
    return best;
}

static int bad_format(const QWeight& w, int64_t K) {
    return w.K != K || K <= 0 || K % 32 || (w.bits != 4 && w.bits != 6 && w.bits != 8) ||
           (w.group != 16 && w.group != 32) || w.sb_groups < 1 || (K / w.group) % w.sb_groups ||
           w.offset < 0 || w.offset > 255;
}

// Y[:, cols[p] : cols[p] + ws[p].N] = X . W_p^T (+ bias[cols[p]:...]) for every part p: the
// parts of one layer side by side (e.g. q|k in Q4_K beside v in Q6_K). The activations
// are quantised once for all parts, and one parallel region covers all their tiles.
// 0 on success; 1 bad shape or format; 2 out of memory.
int specdec_qgemm_multi(const float* x, int64_t M, int64_t ldx, const QWeight* ws, int nparts,
                        const int64_t* cols, const float* bias, float* y, int64_t ldy,
                        int nthreads) {
    if (M <= 0 || nparts <= 0 || nparts > 8) return 1;
    const int64_t K = ws[0].K;
    int64_t first_tile[9] = {0};
    for (int p = 0; p < nparts; p++) {
        if (bad_format(ws[p], K)) return 1;
        first_tile[p + 1] = first_tile[p] + (ws[p].N + 15) / 16;
    }
    const int64_t nc = K / 32;
    // the codes; da, bs16, bs32 (4 floats per row and chunk); is16, is32 (3 ints); the
    // offset starts of each part (at most 2 ints per row and chunk)
    char* buf = (char*)std::malloc(M * K + 4 * M * nc * (4 + 3 + 2 * nparts));
    if (!buf) return 2;
    int8_t* xq = (int8_t*)buf;
    float* da = (float*)(buf + M * K);  // M*K is a multiple of 32: aligned for floats
    float* bs16 = da + M * nc;
    float* bs32 = bs16 + 2 * M * nc;
    int32_t* is16 = (int32_t*)(bs32 + M * nc);
    int32_t* is32 = is16 + 2 * M * nc;
    int32_t* unused_starts = is32 + M * nc;
    const int vnni = vnni_usable();
    if (vnni)
        quantise_rows_avx512(x, M, K, ldx, xq, da, bs16, bs32, is16, is32);
    else
        quantise_rows(x, M, K, ldx, xq, da, bs16, bs32, is16, is32);
    const Act a{xq, da, bs16, bs32, is16, is32, M};
    TileRows run[8];
    const int32_t* starts[8] = {nullptr};
    for (int p = 0; p < nparts; p++) {
        run[p] = vnni ? pick_vnni(ws[p]) : nullptr;
        if (!ws[p].offset) continue;
        for (int q = 0; q < p && !starts[p]; q++)  // parts of one format share their starts
            if (ws[q].offset == ws[p].offset && ws[q].group == ws[p].group) starts[p] = starts[q];
        if (!starts[p]) {
            offset_starts(a, K, ws[p].group, ws[p].offset, unused_starts);
            starts[p] = unused_starts;
            unused_starts += K / ws[p].group * M;
        }
    }
    // Threads take contiguous tile ranges of equal *bytes* (a 6-bit tile reads half as much
    // again as a 4-bit one): ranges fixed by shapes and thread count, so a tile's result
    // never depends on who computes it, and each thread streams one stretch of memory.
    double total = 0.0;
    for (int p = 0; p < nparts; p++)
        total += (double)(first_tile[p + 1] - first_tile[p]) * ws[p].bits;
#pragma omp parallel num_threads(nthreads)
    {
        const int nth = omp_get_num_threads(), me = omp_get_thread_num();
        const double lo = total * me / nth, hi = total * (me + 1) / nth;
        double at = 0.0;
        for (int p = 0; p < nparts; p++) {
            for (int64_t t = first_tile[p]; t < first_tile[p + 1]; t++) {
                const double mid = at + 0.5 * ws[p].bits;  // a tile goes where its middle falls
                at += ws[p].bits;
                if (mid < lo || mid >= hi) continue;
                float* yp = y + cols[p];
                const float* bp = bias ? bias + cols[p] : nullptr;
                if (vnni)
                    run[p](ws[p], t - first_tile[p], a, starts[p], M, yp, ldy, bp);
                else
                    tile_portable(ws[p], t - first_tile[p], a, starts[p], 0, M, yp, ldy, bp);
            }
        }
    }
    std::free(buf);
    return 0;
}

}  // extern "C"
