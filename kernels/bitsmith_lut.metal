// bitsmith lookup-table matmuls for Metal: a line-for-line twin of kernels/bitsmith_lut.cu
// (same layout, kernel names and argument order; see that file and
// src/infer/kernels/lut.rs): w[o, j] = scale[o, g_idx[j]] * table[code[o, j]].
//
// - bitsmith_lut_gemv_m{1..8}: y[m, n] for m <= 8 rows. One simdgroup per output row, its
//   lanes striding over the columns, one f32 accumulator per input row, simd_sum at the
//   end. Threadgroups of 256 threads (8 rows); dispatch ceil(n / 8) threadgroups.
// - bitsmith_lut_dequantize: the dense f32 weights [n, k], one thread per weight, for the
//   launcher's large-batch path; dispatch ceil(n * k / 256) threadgroups of 256.
//
// Not compiled or run in bitsmith's CI: the Metal compiler exists only on macOS.

#include <metal_stdlib>
using namespace metal;

#define LUT_THREADS 256
#define LUT_WARPS (LUT_THREADS / 32)

// Code j of a row's LSB-first stream of `bits`-bit codes (may straddle two words).
static inline uint lut_code(device const uint* row, uint bits, uint j) {
    const uint bit = j * bits, word = bit >> 5, shift = bit & 31u;
    uint v = row[word] >> shift;
    if (shift + bits > 32u) v |= row[word + 1] << (32u - shift);
    return v & ((1u << bits) - 1u);
}

// Copy the table into threadgroup memory (every thread of the threadgroup takes part).
static inline void lut_load_table(threadgroup float* t, device const float* table, uint bits,
                                  uint tid) {
    for (uint i = tid; i < (1u << bits); i += LUT_THREADS) t[i] = table[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
}

template <int M>
kernel void bitsmith_lut_gemv(device const uint* words [[buffer(0)]],
                              device const float* scales [[buffer(1)]],
                              device const uint* g_idx [[buffer(2)]],
                              device const float* table [[buffer(3)]],
                              constant uint& bits [[buffer(4)]],
                              constant int& row_words [[buffer(5)]],
                              constant int& n_groups [[buffer(6)]],
                              device const float* x [[buffer(7)]],
                              constant int& k [[buffer(8)]],
                              device float* y [[buffer(9)]],
                              constant int& n [[buffer(10)]],
                              uint tg [[threadgroup_position_in_grid]],
                              uint tid [[thread_index_in_threadgroup]],
                              uint warp [[simdgroup_index_in_threadgroup]],
                              uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float t[256];
    lut_load_table(t, table, bits, tid);
    const int row = int(tg) * LUT_WARPS + int(warp);
    float acc[M];
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    if (row < n) {
        device const uint* rw = words + ulong(row) * row_words;
        device const float* rs = scales + ulong(row) * n_groups;
        for (int j = int(lane); j < k; j += 32) {
            const float w = t[lut_code(rw, bits, uint(j))] * rs[g_idx[j]];
            for (int m = 0; m < M; ++m) acc[m] = fma(w, x[ulong(m) * k + j], acc[m]);
        }
    }
    // every lane takes part in the reduction (rows past n contribute zeros)
    for (int m = 0; m < M; ++m) {
        const float v = simd_sum(acc[m]);
        if (row < n && lane == 0) y[ulong(m) * n + row] = v;
    }
}

#define BITSMITH_LUT_GEMV(M) \
    template [[host_name("bitsmith_lut_gemv_m" #M)]] kernel void bitsmith_lut_gemv<M>( \
        device const uint*, device const float*, device const uint*, device const float*, \
        constant uint&, constant int&, constant int&, device const float*, constant int&, \
        device float*, constant int&, uint, uint, uint, uint);
BITSMITH_LUT_GEMV(1)
BITSMITH_LUT_GEMV(2)
BITSMITH_LUT_GEMV(3)
BITSMITH_LUT_GEMV(4)
BITSMITH_LUT_GEMV(5)
BITSMITH_LUT_GEMV(6)
BITSMITH_LUT_GEMV(7)
BITSMITH_LUT_GEMV(8)

kernel void bitsmith_lut_dequantize(device const uint* words [[buffer(0)]],
                                    device const float* scales [[buffer(1)]],
                                    device const uint* g_idx [[buffer(2)]],
                                    device const float* table [[buffer(3)]],
                                    constant uint& bits [[buffer(4)]],
                                    constant int& row_words [[buffer(5)]],
                                    constant int& n_groups [[buffer(6)]],
                                    constant int& k [[buffer(7)]],
                                    device float* w [[buffer(8)]],
                                    constant int& n [[buffer(9)]],
                                    uint tg [[threadgroup_position_in_grid]],
                                    uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float t[256];
    lut_load_table(t, table, bits, tid);
    const ulong e = ulong(tg) * LUT_THREADS + tid;
    if (e >= ulong(n) * ulong(k)) return;
    const int row = int(e / ulong(k)), j = int(e % ulong(k));
    const uint code = lut_code(words + ulong(row) * row_words, bits, uint(j));
    w[e] = t[code] * scales[ulong(row) * n_groups + g_idx[j]];
}
