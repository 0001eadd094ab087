// bitsmith lookup-table matmuls for CUDA: codebook layers (NUPES' power grid, the
// `bitsmith_codebook` format), w[o, j] = scale[o, g_idx[j]] * table[code[o, j]], on the
// layout of src/infer/kernels/lut.rs:
//
// - codes: per output row an LSB-first stream of `bits`-bit codes in u32 words
//   (`row_words` per row; code j occupies bits j*bits .. j*bits + bits of the stream, and
//   may straddle two words at widths that do not divide 32);
// - scales: f32 `[n, n_groups]` (one row's scales contiguous);
// - g_idx: u32 `[k]`, the group of every input column (act-order's map, or j / group);
// - table: f32 `[2^bits]`, the unit value of every code, held in shared memory.
//
// Kernels (extern "C" names for the launcher src/infer/kernels/lut/cuda.rs):
// - bitsmith_lut_gemv_m{1..8}: y[m, n] for m <= 8 rows. One warp per output row, its lanes
//   striding over the columns (x reads coalesced across lanes), one f32 accumulator per
//   input row, a shuffle reduction at the end. Blocks of 256 threads (8 rows).
// - bitsmith_lut_dequantize: the dense f32 weights [n, k], one thread per weight, for the
//   launcher's large-batch path (candle's GEMM on the transient matrix, as on the CPU).
//
// The Metal twin is kernels/bitsmith_lut.metal (launcher src/infer/kernels/lut/metal.rs).

#include <stdint.h>

#define LUT_THREADS 256
#define LUT_WARPS (LUT_THREADS / 32)

// Code j of a row's stream.
__device__ __forceinline__ uint32_t lut_code(const uint32_t* __restrict__ row, uint32_t bits,
                                             uint32_t j) {
    const uint32_t bit = j * bits, word = bit >> 5, shift = bit & 31u;
    uint32_t v = __ldg(row + word) >> shift;
    if (shift + bits > 32u) v |= __ldg(row + word + 1) << (32u - shift);
    return v & ((1u << bits) - 1u);
}

// Copy the table into shared memory (every thread of the block takes part).
__device__ __forceinline__ void lut_load_table(float* shared_table,
                                               const float* __restrict__ table, uint32_t bits) {
    for (uint32_t i = threadIdx.x; i < (1u << bits); i += blockDim.x) shared_table[i] = table[i];
    __syncthreads();
}

template <int M>
__device__ __forceinline__ void lut_gemv_rows(const uint32_t* __restrict__ words,
                                              const float* __restrict__ scales,
                                              const uint32_t* __restrict__ g_idx,
                                              const float* __restrict__ table, uint32_t bits,
                                              int row_words, int n_groups,
                                              const float* __restrict__ x, int k,
                                              float* __restrict__ y, int n) {
    __shared__ float t[256];
    lut_load_table(t, table, bits);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row = blockIdx.x * LUT_WARPS + warp;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    if (row < n) {
        const uint32_t* rw = words + (size_t)row * row_words;
        const float* rs = scales + (size_t)row * n_groups;
        for (int j = lane; j < k; j += 32) {
            const float w = t[lut_code(rw, bits, (uint32_t)j)] * __ldg(rs + __ldg(g_idx + j));
#pragma unroll
            for (int m = 0; m < M; ++m) acc[m] = fmaf(w, __ldg(x + (size_t)m * k + j), acc[m]);
        }
    }
    // every lane takes part in the shuffles (rows past n contribute zeros)
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float v = acc[m];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (row < n && lane == 0) y[(size_t)m * n + row] = v;
    }
}

#define BITSMITH_LUT_GEMV(M)                                                                   \
    extern "C" __global__ void __launch_bounds__(LUT_THREADS) bitsmith_lut_gemv_m##M(          \
        const uint32_t* words, const float* scales, const uint32_t* g_idx, const float* table, \
        uint32_t bits, int row_words, int n_groups, const float* x, int k, float* y, int n) {  \
        lut_gemv_rows<M>(words, scales, g_idx, table, bits, row_words, n_groups, x, k, y, n);  \
    }
BITSMITH_LUT_GEMV(1)
BITSMITH_LUT_GEMV(2)
BITSMITH_LUT_GEMV(3)
BITSMITH_LUT_GEMV(4)
BITSMITH_LUT_GEMV(5)
BITSMITH_LUT_GEMV(6)
BITSMITH_LUT_GEMV(7)
BITSMITH_LUT_GEMV(8)

// w[o, j] for every weight; grid = ceil(n * k / 256) blocks of 256 threads.
extern "C" __global__ void __launch_bounds__(LUT_THREADS) bitsmith_lut_dequantize(
    const uint32_t* __restrict__ words, const float* __restrict__ scales,
    const uint32_t* __restrict__ g_idx, const float* __restrict__ table, uint32_t bits,
    int row_words, int n_groups, int k, float* __restrict__ w, int n) {
    __shared__ float t[256];
    lut_load_table(t, table, bits);
    const size_t e = (size_t)blockIdx.x * LUT_THREADS + threadIdx.x;
    if (e >= (size_t)n * k) return;
    const int row = (int)(e / k), j = (int)(e % k);
    const uint32_t code = lut_code(words + (size_t)row * row_words, bits, (uint32_t)j);
    w[e] = t[code] * scales[(size_t)row * n_groups + g_idx[j]];
}
