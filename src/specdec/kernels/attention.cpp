// Softmax attention of a few query rows over the KV cache, in float32.
//
// Why: a decode step or a verified draft has 1-16 query rows; torch's CPU SDPA (or two
// batched matmuls) costs 40-100 us per layer call at that size on two cores, mostly
// fixed overhead, which is a tenth of a quantised 1.5B step over 28 layers. Here each
// (head, row) pair is one independent task: scores against every visible key, a
// softmax, and the weighted sum of values, written straight into the [n, H*D] layout
// the output projection reads. Rows never interact, so a row's result does not depend
// on how many rows the pass has.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <immintrin.h>

#include "native.h"
#include "simd.h"

namespace {

// One (head, row): D a multiple of 16. The visible keys are gathered first (``seen``: their
// slots in order), and every later step runs over that list: a key's place in the sums
// is its rank among the visible keys, not its slot, so a tree node (whose hidden
// siblings sit between its visible keys) gets bit for bit what the same path run as a
// chain gets. Quantised models need this: a one-ulp change can flip an int8 activation
// code downstream, and that moves logits by ~0.1.
SPECDEC_AVX512 void attend_row_avx512(const float* q, const float* k, const float* v,
                                      int64_t stride, int64_t L, int64_t D, const uint8_t* mask,
                                      float scale, float* scores, int32_t* seen, float* out) {
    float mx = -INFINITY;
    int64_t cnt = 0;
    for (int64_t j = 0; j < L; j++) {
        if (mask && !mask[j]) continue;
        const float* kj = k + j * stride;
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(kj));
        for (int64_t d = 16; d < D; d += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(kj + d), acc);
        const float s = _mm512_reduce_add_ps(acc) * scale;
        seen[cnt] = (int32_t)j;
        scores[cnt++] = s;
        mx = s > mx ? s : mx;
    }
    __m512 total = _mm512_setzero_ps();
    const __m512 vmx = _mm512_set1_ps(mx);
    int64_t j = 0;
    for (; j + 16 <= cnt; j += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + j), vmx));
        _mm512_storeu_ps(scores + j, e);
        total = _mm512_add_ps(total, e);
    }
    if (j < cnt) {
        const __mmask16 tail = (__mmask16)((1u << (cnt - j)) - 1);
        const __m512 s = _mm512_mask_loadu_ps(vmx, tail, scores + j);
        const __m512 e = exp512(_mm512_sub_ps(s, vmx));
        _mm512_mask_storeu_ps(scores + j, tail, e);
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(total);
    for (int64_t d = 0; d < D; d += 64) {  // up to 4 accumulators of 16 per pass over the keys
        const int64_t w = D - d < 64 ? D - d : 64;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t r = 0; r < cnt; r++) {
            const __m512 bp = _mm512_set1_ps(scores[r]);
            const float* vj = v + (int64_t)seen[r] * stride + d;
            a0 = _mm512_fmadd_ps(bp, _mm512_loadu_ps(vj), a0);
            if (w > 16) a1 = _mm512_fmadd_ps(bp, _mm512_loadu_ps(vj + 16), a1);
            if (w > 32) a2 = _mm512_fmadd_ps(bp, _mm512_loadu_ps(vj + 32), a2);
            if (w > 48) a3 = _mm512_fmadd_ps(bp, _mm512_loadu_ps(vj + 48), a3);
        }
        const __m512 vinv = _mm512_set1_ps(inv);
        _mm512_storeu_ps(out + d, _mm512_mul_ps(a0, vinv));
        if (w > 16) _mm512_storeu_ps(out + d + 16, _mm512_mul_ps(a1, vinv));
        if (w > 32) _mm512_storeu_ps(out + d + 32, _mm512_mul_ps(a2, vinv));
        if (w > 48) _mm512_storeu_ps(out + d + 48, _mm512_mul_ps(a3, vinv));
    }
}

// The same over the visible keys in order, one lane at a time.
void attend_row_portable(const float* q, const float* k, const float* v, int64_t stride,
                         int64_t L, int64_t D, const uint8_t* mask, float scale, float* scores,
                         int32_t* seen, float* out) {
    float mx = -INFINITY;
    int64_t cnt = 0;
    for (int64_t j = 0; j < L; j++) {
        if (mask && !mask[j]) continue;
        float s = 0.0f;
        for (int64_t d = 0; d < D; d++) s += q[d] * k[j * stride + d];
        seen[cnt] = (int32_t)j;
        scores[cnt] = s * scale;
        mx = scores[cnt] > mx ? scores[cnt] : mx;
        cnt++;
    }
    float total = 0.0f;
    for (int64_t r = 0; r < cnt; r++) {
        scores[r] = std::exp(scores[r] - mx);
        total += scores[r];
    }
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t r = 0; r < cnt; r++)
        for (int64_t d = 0; d < D; d++) out[d] += scores[r] * v[seen[r] * stride + d];
    for (int64_t d = 0; d < D; d++) out[d] /= total;
}

}  // namespace

extern "C" {

// q: [H][n][D] contiguous; k, v: [Hkv][>= L][D] with `head_stride` floats between heads
// and D between slots; mask: [n][L] bytes (0: hidden) or NULL; out[i * ldo + h * D + d].
// Heads are grouped as in GQA: head h reads kv head h / (H / Hkv).
// 0 on success; 1 bad shape; 2 out of memory.
int specdec_attend(const float* q, int64_t H, int64_t n, int64_t D, const float* k,
                   const float* v, int64_t Hkv, int64_t head_stride, int64_t L,
                   const uint8_t* mask, float* out, int64_t ldo, int nthreads) {
    if (H <= 0 || n <= 0 || D <= 0 || L <= 0 || Hkv <= 0 || H % Hkv) return 1;
    const int64_t group = H / Hkv;
    const float scale = 1.0f / std::sqrt((float)D);
    const int vec = avx512_usable() && D % 16 == 0;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float* scores = (float*)std::malloc((sizeof(float) + sizeof(int32_t)) * L);
        int32_t* seen = (int32_t*)(scores + L);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < H * n; task++) {
            if (!scores) continue;
            const int64_t h = task / n, i = task % n;
            const float* kh = k + (h / group) * head_stride;
            const float* vh = v + (h / group) * head_stride;
            const uint8_t* mi = mask ? mask + i * L : nullptr;
            float* o = out + i * ldo + h * D;
            if (vec)
                attend_row_avx512(q + (h * n + i) * D, kh, vh, D, L, D, mi, scale, scores, seen,
                                  o);
            else
                attend_row_portable(q + (h * n + i) * D, kh, vh, D, L, D, mi, scale, scores, seen,
                                    o);
        }
        std::free(scores);
    }
    return failed ? 2 : 0;
}

}  // extern "C"
