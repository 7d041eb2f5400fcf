// One decoder layer of the Llama family (llama, mistral, qwen2) with quantised linears,
// in float32, in one native call.
//
// Why: around its four matmuls a layer does ~30 small tensor operations (norms, RoPE,
// cache writes, attention, SiLU, residuals); driven from Python they cost 6-9 ms of a
// 45 ms quantised 1.5B step on two cores. Here they are plain loops between the kernel
// calls. Every operation is per row (a token), so a pass over k tokens computes each
// row exactly as a one-token pass would: verifying a draft gives the same logits, bit
// for bit, as decoding it token by token.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "native.h"
#include "simd.h"

extern "C" {

struct LinearParts {
    const QWeight* parts;  // side by side along N
    const int64_t* cols;   // first output column of each part
    int32_t nparts;
    const float* bias;  // [N] or null
};

struct LayerParams {
    LinearParts qkv;  // [H*D | Hkv*D | Hkv*D]
    LinearParts wo;
    LinearParts w13;  // [gate | up]
    LinearParts w2;
    const float* attn_norm;  // [d]
    const float* ffn_norm;   // [d]
    int64_t d, heads, kv_heads, head_dim, ffn;
    float eps;
};

}  // extern "C"

namespace {

// out = x * rsqrt(mean(x^2) + eps) * w, row by row
void rms_norm(const float* x, int64_t n, int64_t d, const float* w, float eps, float* out) {
    for (int64_t i = 0; i < n; i++) {
        const float* xi = x + i * d;
        double ss = 0.0;  // double: the sum of 1536-8960 squares keeps its digits
        for (int64_t j = 0; j < d; j++) ss += (double)xi[j] * xi[j];
        const float r = 1.0f / std::sqrt((float)(ss / d) + eps);
        for (int64_t j = 0; j < d; j++) out[i * d + j] = (xi[j] * r) * w[j];
    }
}

// out = silu(gate) * up = gate / (1 + exp(-gate)) * up
SPECDEC_AVX512 void silu_mul_avx512(const float* gate, const float* up, int64_t f, float* out) {
    int64_t j = 0;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; j + 16 <= f; j += 16) {
        const __m512 g = _mm512_loadu_ps(gate + j);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, e));
        _mm512_storeu_ps(out + j, _mm512_mul_ps(s, _mm512_loadu_ps(up + j)));
    }
    for (; j < f; j++) out[j] = gate[j] / (1.0f + std::exp(-gate[j])) * up[j];
}

void silu_mul(const float* gate, const float* up, int64_t f, float* out) {
    if (avx512_usable()) return silu_mul_avx512(gate, up, f, out);
    for (int64_t j = 0; j < f; j++) out[j] = gate[j] / (1.0f + std::exp(-gate[j])) * up[j];
}

int linear(const LinearParts& l, const float* x, int64_t n, int64_t k, float* y, int64_t ny,
           int nthreads) {
    return specdec_qgemm_multi(x, n, k, l.parts, l.nparts, l.cols, l.bias, y, ny, nthreads);
}

}  // namespace

extern "C" {

// One sequence's rows in a batched pass: its own KV cache and mask.
struct LayerSegment {
    int64_t n;         // rows (consecutive in h, after the previous segment's)
    float* kc;         // [kv_heads, capacity, head_dim]
    float* vc;
    int64_t capacity;
    int64_t start;     // first slot written
    const uint8_t* mask;  // [n, start+n] bytes (0: hidden) or null (every slot visible)
};

// h [n, d] (the residual stream, every segment's rows in order) is updated in place.
// cos/sin [n, head_dim] are the rows' rotary tables (NeoX half rotation). The linears run
// once over all n rows (one read of the weights for the whole batch); each segment's keys
// and values go to slots start..start+n_s-1 of its own cache, and its rows attend only to
// that cache. Every operation is per row, so a row's result does not depend on the other
// segments. 0 on success; else the failing step's code.
int specdec_layer_batch(float* h, int64_t n, const LayerParams* p, const float* cos,
                        const float* sin, const LayerSegment* segs, int64_t nseg, int nthreads) {
    const int64_t d = p->d, H = p->heads, Hkv = p->kv_heads, D = p->head_dim, F = p->ffn;
    const int64_t nq = (H + 2 * Hkv) * D;
    const int64_t scratch = n * (d + nq + H * D + H * D + 2 * F + F + d);
    float* buf = (float*)std::malloc(sizeof(float) * scratch);
    if (!buf) return 2;
    float* x = buf;               // [n, d] normed input
    float* qkv = x + n * d;       // [n, nq]
    float* q = qkv + n * nq;      // per segment [H, n_s, D]: rotated queries
    float* att = q + H * n * D;   // [n, H*D]
    float* gu = att + n * H * D;  // [n, 2F]
    float* act = gu + n * 2 * F;  // [n, F]
    float* o = act + n * F;       // [n, d]
    int rc = 0;
    int64_t total = 0;
    for (int64_t s = 0; s < nseg; s++) total += segs[s].n;
    if (total != n) {
        std::free(buf);
        return 3;
    }

    rms_norm(h, n, d, p->attn_norm, p->eps, x);
    if ((rc = linear(p->qkv, x, n, d, qkv, nq, nthreads))) goto done;
    {
        const int64_t half = D / 2;
        int64_t row = 0;
        for (int64_t s = 0; s < nseg; s++) {
            const LayerSegment& g = segs[s];
            float* qs = q + row * H * D;
            for (int64_t i = 0; i < g.n; i++) {
                const int64_t r = row + i;
                const float* c = cos + r * D;
                const float* sn = sin + r * D;
                for (int64_t hh = 0; hh < H + Hkv; hh++) {  // rotate queries and keys
                    const float* v = qkv + r * nq + hh * D;
                    float* dst = hh < H ? qs + (hh * g.n + i) * D
                                        : g.kc + ((hh - H) * g.capacity + g.start + i) * D;
                    for (int64_t j = 0; j < half; j++) {
                        const float a = v[j], b = v[j + half];
                        dst[j] = a * c[j] + (-b) * sn[j];
                        dst[j + half] = b * c[j + half] + a * sn[j + half];
                    }
                }
                for (int64_t hh = 0; hh < Hkv; hh++)
                    std::memcpy(g.vc + (hh * g.capacity + g.start + i) * D,
                                qkv + r * nq + (H + Hkv + hh) * D, sizeof(float) * D);
            }
            if ((rc = specdec_attend(qs, H, g.n, D, g.kc, g.vc, Hkv, g.capacity * D,
                                     g.start + g.n, g.mask, att + row * H * D, H * D, nthreads)))
                goto done;
            row += g.n;
        }
    }
    if ((rc = linear(p->wo, att, n, H * D, o, d, nthreads))) goto done;
    for (int64_t j = 0; j < n * d; j++) h[j] += o[j];

    rms_norm(h, n, d, p->ffn_norm, p->eps, x);
    if ((rc = linear(p->w13, x, n, d, gu, 2 * F, nthreads))) goto done;
    for (int64_t i = 0; i < n; i++) silu_mul(gu + i * 2 * F, gu + i * 2 * F + F, F, act + i * F);
    if ((rc = linear(p->w2, act, n, F, o, d, nthreads))) goto done;
    for (int64_t j = 0; j < n * d; j++) h[j] += o[j];
done:
    std::free(buf);
    return rc;
}

// One sequence: h [n, d]; its keys and values go to slots start..start+n-1 of kc/vc
// [kv_heads, capacity, head_dim]; mask [n, start+n] bytes or null.
int specdec_layer(float* h, int64_t n, const LayerParams* p, const float* cos, const float* sin,
                  float* kc, float* vc, int64_t capacity, int64_t start, const uint8_t* mask,
                  int nthreads) {
    const LayerSegment seg{n, kc, vc, capacity, start, mask};
    return specdec_layer_batch(h, n, p, cos, sin, &seg, 1, nthreads);
}

}  // extern "C"
