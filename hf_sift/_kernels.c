/*
 * Fused CPU kernels for serving SIFT weights (see docs/FORMAT.md for the arithmetic they implement).
 *
 * They work on raw, contiguous buffers passed as addresses by hf_sift/kernels.py, which checks dtypes, sizes and
 * contiguity, splits the work over threads (the GIL is released while a kernel runs) and falls back to the
 * torch implementation when this module was not built. Every result is bit-identical to that fallback; the
 * tests compare both on edge values.
 *
 * Build flags matter: floating-point contraction (FMA) would round `q * factor + base` once instead of twice,
 * so the module is compiled with -ffp-contract=off and without -ffast-math.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Kinds of served weights: base and output share one dtype. */
enum { KIND_FLOAT32 = 0, KIND_BFLOAT16 = 1 };

static inline double bf16_to_double(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return (double)value;
}

/* float -> bfloat16, round to nearest even, NaN -> 0x7FC0: torch's rule. */
static inline uint16_t float_to_bf16(float value) {
    if (isnan(value)) return 0x7FC0;
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits += ((bits >> 16) & 1u) + 0x7FFFu;
    return (uint16_t)(bits >> 16);
}

/* One served element. `negate` mirrors the torch path: the term is float64(±Q·m) · (∓factor) with the sign
 * chosen so that a zero term is -0.0, and θ0 + (-0.0) is θ0 bit for bit. */
static inline double served_value(double base, int64_t q, int64_t keep, int negate, double factor) {
    int64_t s = negate ? (int64_t)(0u - (uint64_t)q) : q;
    double term = (double)(s & keep) * factor;
    return base + term;
}

#define SERVE_LOOP(BASE_T, LOAD, STORE)                                                                 \
    do {                                                                                               \
        BASE_T *out = (BASE_T *)out_addr;                                                              \
        const BASE_T *base = (const BASE_T *)base_addr;                                                \
        if (mask == NULL) {                                                                            \
            for (Py_ssize_t i = start; i < stop; i++)                                                  \
                out[i] = STORE(served_value(LOAD(base[i]), q[i], -1, negate, factor));                 \
        } else {                                                                                       \
            Py_ssize_t i = start;                                                                      \
            for (; i < stop && (i & 7); i++) {                                                         \
                int64_t keep = -(int64_t)((mask[i >> 3] >> (i & 7)) & 1u);                             \
                out[i] = STORE(served_value(LOAD(base[i]), q[i], keep, negate, factor));               \
            }                                                                                          \
            for (; i + 8 <= stop; i += 8) { /* one mask byte per 8 elements */                         \
                unsigned bits = mask[i >> 3];                                                          \
                for (int j = 0; j < 8; j++) {                                                          \
                    int64_t keep = -(int64_t)((bits >> j) & 1u);                                       \
                    out[i + j] = STORE(served_value(LOAD(base[i + j]), q[i + j], keep, negate, factor)); \
                }                                                                                      \
            }                                                                                          \
            for (; i < stop; i++) {                                                                    \
                int64_t keep = -(int64_t)((mask[i >> 3] >> (i & 7)) & 1u);                             \
                out[i] = STORE(served_value(LOAD(base[i]), q[i], keep, negate, factor));               \
            }                                                                                          \
        }                                                                                              \
    } while (0)

#define LOAD_F32(x) ((double)(x))
#define STORE_F32(x) ((float)(x))
#define LOAD_BF16(x) bf16_to_double(x)
#define STORE_BF16(x) float_to_bf16((float)(x))

/* serve(kind, out, base, q, mask_or_0, factor, negate, start, stop) */
static PyObject *serve(PyObject *Py_UNUSED(self), PyObject *args) {
    int kind, negate;
    unsigned long long out_addr, base_addr, q_addr, mask_addr;
    Py_ssize_t start, stop;
    double factor;
    if (!PyArg_ParseTuple(args, "iKKKKdpnn", &kind, &out_addr, &base_addr, &q_addr, &mask_addr, &factor, &negate,
                          &start, &stop))
        return NULL;
    if (kind != KIND_FLOAT32 && kind != KIND_BFLOAT16) {
        PyErr_SetString(PyExc_ValueError, "unsupported kind");
        return NULL;
    }
    const int64_t *q = (const int64_t *)q_addr;
    const uint8_t *mask = (const uint8_t *)mask_addr;
    Py_BEGIN_ALLOW_THREADS
    if (kind == KIND_FLOAT32)
        SERVE_LOOP(float, LOAD_F32, STORE_F32);
    else
        SERVE_LOOP(uint16_t, LOAD_BF16, STORE_BF16);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#if defined(__SSE2__)
#define SELECT_BULK select_sse2
#else
#define SELECT_BULK(itemsize, out, keep, drop, mask, i, stop) (i)
#endif

#define SELECT_LOOP(T)                                                                                 \
    do {                                                                                               \
        T *out = (T *)out_addr;                                                                        \
        const T *keep = (const T *)keep_addr, *drop = (const T *)drop_addr;                            \
        Py_ssize_t i = start;                                                                          \
        for (; i < stop && (i & 7); i++)                                                               \
            out[i] = ((mask[i >> 3] >> (i & 7)) & 1u) ? keep[i] : drop[i];                             \
        i = SELECT_BULK(sizeof(T), (char *)out, (const char *)keep, (const char *)drop, mask, i, stop);  \
        for (; i + 8 <= stop; i += 8) {                                                                \
            unsigned bits = mask[i >> 3];                                                              \
            for (int j = 0; j < 8; j++) {                                                              \
                T all = (T)0 - (T)((bits >> j) & 1u);                                                  \
                out[i + j] = drop[i + j] ^ ((keep[i + j] ^ drop[i + j]) & all);                        \
            }                                                                                          \
        }                                                                                              \
        for (; i < stop; i++)                                                                          \
            out[i] = ((mask[i >> 3] >> (i & 7)) & 1u) ? keep[i] : drop[i];                             \
    } while (0)

#if defined(__SSE2__)
#include <emmintrin.h>
/* The bulk of a 4- or 2-byte select with SSE2: 8 elements per mask byte, written with non-temporal stores (the
 * output is not read back soon, and streaming it skips reading each cache line before it is overwritten, a
 * quarter of the traffic). Returns the first element not done; `i` must be a multiple of 8. */
static Py_ssize_t select_sse2(int itemsize, char *out, const char *keep, const char *drop, const uint8_t *mask,
                              Py_ssize_t i, Py_ssize_t stop) {
    if (((uintptr_t)(out + i * itemsize) & 15) != 0) return i; /* streaming stores need 16-byte alignment */
    if (itemsize == 4) {
        const __m128i lo = _mm_setr_epi32(1, 2, 4, 8), hi = _mm_setr_epi32(16, 32, 64, 128);
        for (; i + 8 <= stop; i += 8) {
            __m128i bits = _mm_set1_epi32(mask[i >> 3]);
            __m128i m0 = _mm_cmpeq_epi32(_mm_and_si128(bits, lo), lo);
            __m128i m1 = _mm_cmpeq_epi32(_mm_and_si128(bits, hi), hi);
            __m128i k0 = _mm_loadu_si128((const __m128i *)(keep + i * 4));
            __m128i k1 = _mm_loadu_si128((const __m128i *)(keep + i * 4 + 16));
            __m128i d0 = _mm_loadu_si128((const __m128i *)(drop + i * 4));
            __m128i d1 = _mm_loadu_si128((const __m128i *)(drop + i * 4 + 16));
            _mm_stream_si128((__m128i *)(out + i * 4), _mm_xor_si128(d0, _mm_and_si128(_mm_xor_si128(k0, d0), m0)));
            _mm_stream_si128((__m128i *)(out + i * 4 + 16),
                             _mm_xor_si128(d1, _mm_and_si128(_mm_xor_si128(k1, d1), m1)));
        }
    } else if (itemsize == 2) {
        const __m128i lanes = _mm_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128);
        for (; i + 8 <= stop; i += 8) {
            __m128i bits = _mm_set1_epi16(mask[i >> 3]);
            __m128i m = _mm_cmpeq_epi16(_mm_and_si128(bits, lanes), lanes);
            __m128i k = _mm_loadu_si128((const __m128i *)(keep + i * 2));
            __m128i d = _mm_loadu_si128((const __m128i *)(drop + i * 2));
            _mm_stream_si128((__m128i *)(out + i * 2), _mm_xor_si128(d, _mm_and_si128(_mm_xor_si128(k, d), m)));
        }
    }
    _mm_sfence();
    return i;
}
#endif

/* select(itemsize, out, keep, drop, mask, start, stop): out = bit ? keep : drop, bit for bit. */
static PyObject *select_bits(PyObject *Py_UNUSED(self), PyObject *args) {
    int itemsize;
    unsigned long long out_addr, keep_addr, drop_addr, mask_addr;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "iKKKKnn", &itemsize, &out_addr, &keep_addr, &drop_addr, &mask_addr, &start, &stop))
        return NULL;
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "unsupported itemsize");
        return NULL;
    }
    const uint8_t *mask = (const uint8_t *)mask_addr;
    Py_BEGIN_ALLOW_THREADS
    switch (itemsize) {
    case 1: SELECT_LOOP(uint8_t); break;
    case 2: SELECT_LOOP(uint16_t); break;
    case 4: SELECT_LOOP(uint32_t); break;
    default: SELECT_LOOP(uint64_t); break;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"serve", serve, METH_VARARGS, "Served SIFT weights of a flat range (see hf_sift/kernels.py)."},
    {"select_bits", select_bits, METH_VARARGS, "Bitwise select by a packed mask (see hf_sift/kernels.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU kernels of hf_sift.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
