// The C ABI of the native library, shared by its translation units.
#pragma once
#include <cstdint>

extern "C" {

struct QWeight {
    const uint8_t* qs;   // codes, see qgemm.cpp
    const uint16_t* d;   // fp16 [tiles][K/(G*S)][16]
    const uint16_t* dm;  // fp16 [tiles][K/(G*S)][16]
    const int8_t* sc;    // [tiles][K/G][16] or null (S == 1)
    const int8_t* m;     // [tiles][K/G][16] or null (then m = sc)
    int64_t K;
    int64_t N;           // real columns; tiles = ceil(N / 16)
    int32_t bits;        // 4, 6 or 8
    int32_t group;       // G: 16 or 32
    int32_t sb_groups;   // S
    int32_t offset;      // > 0: dm = offset * d and m = sc, so w = d*sc*(u - offset)
};

int specdec_qgemm_multi(const float* x, int64_t M, int64_t ldx, const QWeight* ws, int nparts,
                        const int64_t* cols, const float* bias, float* y, int64_t ldy,
                        int nthreads);

int specdec_attend(const float* q, int64_t H, int64_t n, int64_t D, const float* k,
                   const float* v, int64_t Hkv, int64_t head_stride, int64_t L,
                   const uint8_t* mask, float* out, int64_t ldo, int nthreads);
}
