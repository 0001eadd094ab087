// bitsmith packed-weight matmuls for CUDA, on the layout of src/infer/layout.rs:
//
// - columns in a padded order where every scale/zero group ("span") is contiguous and a
//   multiple of 16 columns; `x` arrives already gathered into that order (`[m, kp]`);
// - per output row, a width's codes in tiles of 16 u32 words: column 16*t + l of a tile is
//   word l, bits t*b .. t*b + b (spt = 32 / b slots per tile), so lane l of a half-warp
//   reads word l and one shift + mask gives its code;
// - per output row and span one u32: f16 scale bits | zero << 16; w = scale * (code - zero).
//
// Kernels (extern "C" names for a launcher):
// - bitsmith_gemv_m{1..8}: y[m, n] for m <= 8 rows; one warp per output row, the two
//   half-warps take alternate slots, f32 accumulation, warp-shuffle reduction.
//   grid = ceil(n / 8) blocks of 256 threads.
// - bitsmith_gemm: tiled f32 GEMM for large m; each 64x64 output tile dequantizes a
//   16-column slot of 64 weight rows into shared memory per step (never the whole matrix).
//   grid = (ceil(n / 64), ceil(m / 64)) blocks of 256 threads.
//
// The Metal twin is kernels/bitsmith_matmul.metal (same names, same arguments).

#include <cuda_fp16.h>
#include <stdint.h>

struct Span {
    uint32_t bits;        // code width, 1..8
    uint32_t slots;       // 16-column slots in the span
    uint32_t col0;        // first padded column
    uint32_t tile_word0;  // word offset (within a row) of the tile holding the first slot
    uint32_t t0;          // index of the first slot inside that tile
};

__device__ __forceinline__ float scale_of(uint32_t p) {
    return __half2float(__ushort_as_half((unsigned short)(p & 0xffffu)));
}

template <int M>
__device__ __forceinline__ void gemv_row(const uint32_t* __restrict__ words,
                                         const uint32_t* __restrict__ params,
                                         const Span* __restrict__ spans, int n_spans,
                                         int row_words, const float* __restrict__ x, int kp,
                                         float* __restrict__ y, int n) {
    const int lane = threadIdx.x & 31;
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= n) return;
    const int half_id = lane >> 4, l16 = lane & 15;
    const uint32_t* rw = words + (size_t)row * row_words;
    float tot[M];
#pragma unroll
    for (int m = 0; m < M; ++m) tot[m] = 0.f;
    for (int si = 0; si < n_spans; ++si) {
        const Span sp = spans[si];
        const uint32_t p = params[(size_t)row * n_spans + si];
        const float s = scale_of(p), z = (float)(p >> 16);
        const uint32_t spt = 32u / sp.bits, mask = (1u << sp.bits) - 1u;
        float acc[M];
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m] = 0.f;
        for (uint32_t i = half_id; i < sp.slots; i += 2) {
            const uint32_t slot = sp.t0 + i, tile = slot / spt, t = slot - tile * spt;
            const uint32_t w = rw[sp.tile_word0 + tile * 16u + l16];
            const float q = (float)((w >> (t * sp.bits)) & mask) - z;
            const int col = sp.col0 + i * 16u + l16;
#pragma unroll
            for (int m = 0; m < M; ++m) acc[m] = fmaf(q, x[(size_t)m * kp + col], acc[m]);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) tot[m] = fmaf(acc[m], s, tot[m]);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float v = tot[m];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) y[(size_t)m * n + row] = v;
    }
}

#define BITSMITH_GEMV(M)                                                                     \
    extern "C" __global__ void bitsmith_gemv_m##M(                                           \
        const uint32_t* words, const uint32_t* params, const Span* spans, int n_spans,       \
        int row_words, const float* x, int kp, float* y, int n) {                            \
        gemv_row<M>(words, params, spans, n_spans, row_words, x, kp, y, n);                  \
    }
BITSMITH_GEMV(1)
BITSMITH_GEMV(2)
BITSMITH_GEMV(3)
BITSMITH_GEMV(4)
BITSMITH_GEMV(5)
BITSMITH_GEMV(6)
BITSMITH_GEMV(7)
BITSMITH_GEMV(8)

#define BM 64  // batch rows per block
#define BN 64  // output rows per block
#define BK 16  // one slot per step

// slot_span[g] = the span holding padded slot g (kp / 16 entries).
extern "C" __global__ void bitsmith_gemm(const uint32_t* __restrict__ words,
                                         const uint32_t* __restrict__ params,
                                         const Span* __restrict__ spans,
                                         const uint32_t* __restrict__ slot_span, int n_spans,
                                         int row_words, const float* __restrict__ x, int m,
                                         int kp, float* __restrict__ y, int n) {
    __shared__ float xs[BK][BM + 4];
    __shared__ float ws[BK][BN + 4];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    float c[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) c[a][b] = 0.f;
    for (int k0 = 0; k0 < kp; k0 += BK) {
        for (int e = tid; e < BM * BK; e += 256) {
            const int i = e / BK, k = e % BK, gi = m0 + i;
            xs[k][i] = gi < m ? x[(size_t)gi * kp + k0 + k] : 0.f;
        }
        const int g = k0 / BK, si = (int)slot_span[g];
        const Span sp = spans[si];
        const uint32_t spt = 32u / sp.bits, mask = (1u << sp.bits) - 1u;
        const uint32_t slot = sp.t0 + (uint32_t)g - sp.col0 / 16u;
        const uint32_t tile = slot / spt, t = slot - tile * spt;
        for (int e = tid; e < BN * BK; e += 256) {
            const int j = e / BK, k = e % BK, gj = n0 + j;
            float v = 0.f;
            if (gj < n) {
                const uint32_t p = params[(size_t)gj * n_spans + si];
                const uint32_t w = words[(size_t)gj * row_words + sp.tile_word0 + tile * 16u + k];
                v = scale_of(p) * ((float)((w >> (t * sp.bits)) & mask) - (float)(p >> 16));
            }
            ws[k][j] = v;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                a[r] = xs[k][ty * 4 + r];
                b[r] = ws[k][tx * 4 + r];
            }
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int q = 0; q < 4; ++q) c[r][q] = fmaf(a[r], b[q], c[r][q]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int gi = m0 + ty * 4 + r;
        if (gi >= m) continue;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int gj = n0 + tx * 4 + q;
            if (gj < n) y[(size_t)gi * n + gj] = c[r][q];
        }
    }
}
