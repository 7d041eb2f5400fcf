// Shared AVX-512 helpers (compiled per function with target attributes, chosen at run time).
#pragma once
#include <cstdlib>
#include <immintrin.h>

#define SPECDEC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

// exp(x): 2^(x*log2 e) split into an integer power (scalef, which saturates to 0 or inf)
// and a degree-6 polynomial on [-0.5, 0.5]; relative error ~2e-7. Inputs below -87 give
// exp(-87) ~ 1.6e-38 rather than denormals.
SPECDEC_AVX512 static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);  // in [-0.5, 0.5]: 2^f by its Taylor series in f*ln2
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}


// Whether the AVX-512 paths may run (SPECDEC_QGEMM_PORTABLE=1 forces the portable ones).
static inline int avx512_usable() {
    static int usable = -1;
    if (usable < 0) {
        const char* env = std::getenv("SPECDEC_QGEMM_PORTABLE");
        __builtin_cpu_init();
        usable = !(env && env[0] == '1') && __builtin_cpu_supports("avx512f");
    }
    return usable;
}
