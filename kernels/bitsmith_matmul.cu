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
// - bitsmith_gemv_m{1..8}: y[m, n] for m <= 8 rows. Work is cut into *chunks*, one per
//   (span, 64-byte tile) pair of a row (the same list for every row, built on the host:
//   PackedLayout::gemv_chunks in src/infer/layout.rs, gemv_chunks() in the test): a chunk
//   names its tile's word offset, its span, the padded column of the tile's slot 0 and the
//   slots t_lo..t_hi of that tile that belong to the span. A group of 4 lanes ("quad") takes
//   one chunk: each lane loads 4 words of the tile with one 128-bit load and unpacks all
//   their slots (per word spt codes, fully unrolled per width). A warp owns `rpw` rows
//   (rows per warp: 1 when a row has >= 8 chunks, else up to 8 so short rows keep every
//   quad busy; bitsmith_gemv_rows_per_warp), its 8 quads split among them, and reduces with
//   shuffles. (code - zero) is formed exactly in f32 (2^23 trick: no int->float convert),
//   summed per chunk against x, then scaled: scale * sum((code - zero) * x), f32 throughout.
//   Blocks of 256 threads (8 warps): grid = ceil(n / (8 * rpw)).
// - bitsmith_gemm: tiled f32 GEMM for large m; each 64x64 output tile dequantizes a
//   16-column slot of 64 weight rows into shared memory per step (never the whole matrix).
//   grid = (ceil(n / 64), ceil(m / 64)) blocks of 256 threads.
//
// Every x, y pointer must be 16-byte aligned (the launchers pass fresh or offset-0 buffers)
// and kp is a multiple of 16.
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

// One (span, tile) piece of a row, as 4 u32 (one 128-bit load).
struct Chunk {
    uint32_t word;  // word offset of the tile within a row
    uint32_t span;  // index into the per-row params
    uint32_t col;   // padded column of the tile's slot 0 (slot t covers col + 16 t ..)
    uint32_t meta;  // bits | t_lo << 8 | t_hi << 16: the tile's slots in this span
};

#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / 32)

// Rows per warp for a layer with n_chunks chunks per row (a power of two, 1..8).
static inline int bitsmith_gemv_rows_per_warp(int n_chunks) {
    int r = 1;
    while (r < 8 && (r * 2) * n_chunks <= 8) r *= 2;
    return r;
}

__device__ __forceinline__ float scale_of(uint32_t p) {
    return __half2float(__ushort_as_half((unsigned short)(p & 0xffffu)));
}

// acc[m] += sum over the chunk's codes of (code - zero) * x[m, col], for one lane's 4 words
// (columns col + 16 t + 4 q + c, c = 0..3). B is the code width.
template <int B, int M>
__device__ __forceinline__ void chunk_dot(const uint4 w, const float zb, uint32_t t_lo,
                                          uint32_t t_hi, const float* __restrict__ x,
                                          int kp, int col, float acc[M]) {
    constexpr int SPT = 32 / B;
    constexpr uint32_t MASK = (1u << B) - 1u;
#pragma unroll
    for (int t = 0; t < SPT; ++t) {
        if ((uint32_t)t < t_lo || (uint32_t)t >= t_hi) continue;
        // 0x4b000000 | c is the float 2^23 + c, so (that - (2^23 + zero)) = c - zero exactly
        const float q0 = __uint_as_float(0x4b000000u | ((w.x >> (t * B)) & MASK)) - zb;
        const float q1 = __uint_as_float(0x4b000000u | ((w.y >> (t * B)) & MASK)) - zb;
        const float q2 = __uint_as_float(0x4b000000u | ((w.z >> (t * B)) & MASK)) - zb;
        const float q3 = __uint_as_float(0x4b000000u | ((w.w >> (t * B)) & MASK)) - zb;
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float4 xv = __ldg(reinterpret_cast<const float4*>(x + (size_t)m * kp + col + 16 * t));
            acc[m] = fmaf(q0, xv.x, acc[m]);
            acc[m] = fmaf(q1, xv.y, acc[m]);
            acc[m] = fmaf(q2, xv.z, acc[m]);
            acc[m] = fmaf(q3, xv.w, acc[m]);
        }
    }
}

template <int M>
__device__ __forceinline__ void gemv_rows(const uint32_t* __restrict__ words,
                                          const uint32_t* __restrict__ params,
                                          const uint4* __restrict__ chunks, int n_chunks,
                                          int n_spans, int row_words, int rpw,
                                          const float* __restrict__ x, int kp,
                                          float* __restrict__ y, int n) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int lanes_per_row = 32 / rpw, quads_per_row = lanes_per_row / 4;
    const int sub = lane / lanes_per_row;                 // which of the warp's rows
    const int quad = (lane % lanes_per_row) >> 2, q = lane & 3;
    const int row = (blockIdx.x * GEMV_WARPS + warp) * rpw + sub;
    float tot[M];
#pragma unroll
    for (int m = 0; m < M; ++m) tot[m] = 0.f;
    if (row < n) {
        const uint32_t* rw = words + (size_t)row * row_words + 4 * q;
        const uint32_t* rp = params + (size_t)row * n_spans;
        int c = quad;
        uint4 ch = make_uint4(0, 0, 0, 0), w = ch;
        if (c < n_chunks) {
            ch = __ldg(chunks + c);
            w = __ldg(reinterpret_cast<const uint4*>(rw + ch.x));
        }
        while (c < n_chunks) {
            // prefetch the next chunk's words while this one is unpacked
            const int c2 = c + quads_per_row;
            uint4 ch2 = ch, w2 = w;
            if (c2 < n_chunks) {
                ch2 = __ldg(chunks + c2);
                w2 = __ldg(reinterpret_cast<const uint4*>(rw + ch2.x));
            }
            const uint32_t p = __ldg(rp + ch.y);
            const float s = scale_of(p), zb = 8388608.f + (float)(p >> 16);
            const uint32_t bits = ch.w & 0xffu, t_lo = (ch.w >> 8) & 0xffu, t_hi = ch.w >> 16;
            const int col = (int)ch.z + 4 * q;
            float acc[M];
#pragma unroll
            for (int m = 0; m < M; ++m) acc[m] = 0.f;
            switch (bits) {
                case 1: chunk_dot<1, M>(w, zb, t_lo, t_hi, x, kp, col, acc); break;
                case 2: chunk_dot<2, M>(w, zb, t_lo, t_hi, x, kp, col, acc); break;
                case 3: chunk_dot<3, M>(w, zb, t_lo, t_hi, x, kp, col, acc); break;
                case 4: chunk_dot<4, M>(w, zb, t_lo, t_hi, x, kp, col, acc); break;
                case 5: chunk_dot<5, M>(w, zb, t_lo, t_hi, x, kp, col, acc); break;
                case 6: chunk_dot<6, M>(w, zb, t_lo, t_hi, x, kp, col, acc); break;
                case 7: chunk_dot<7, M>(w, zb, t_lo, t_hi, x, kp, col, acc); break;
                default: chunk_dot<8, M>(w, zb, t_lo, t_hi, x, kp, col, acc); break;
            }
#pragma unroll
            for (int m = 0; m < M; ++m) tot[m] = fmaf(acc[m], s, tot[m]);
            c = c2;
            ch = ch2;
            w = w2;
        }
    }
    // every lane takes part in the shuffles (rows past n contribute zeros)
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float v = tot[m];
        for (int o = lanes_per_row >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (row < n && (lane % lanes_per_row) == 0) y[(size_t)m * n + row] = v;
    }
}

#define BITSMITH_GEMV(M)                                                                     \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) bitsmith_gemv_m##M(           \
        const uint32_t* words, const uint32_t* params, const uint4* chunks, int n_chunks,    \
        int n_spans, int row_words, int rpw, const float* x, int kp, float* y, int n) {      \
        gemv_rows<M>(words, params, chunks, n_chunks, n_spans, row_words, rpw, x, kp, y, n); \
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
