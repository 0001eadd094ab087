// bitsmith packed-weight matmuls for Metal: a line-for-line twin of
// kernels/bitsmith_matmul.cu (same layout, kernel names and argument order; see that file
// and src/infer/layout.rs for the layout). A warp is a 32-wide simdgroup here.
//
// - bitsmith_gemv_m{1..8}: one simdgroup per output row; threadgroups of 256 threads,
//   dispatch ceil(n / 8) threadgroups.
// - bitsmith_gemm: 64x64 output tiles, threadgroups of 256 threads, grid
//   (ceil(n / 64), ceil(m / 64)) threadgroups.
//
// Not compiled or run in bitsmith's CI: the Metal compiler exists only on macOS.

#include <metal_stdlib>
using namespace metal;

struct Span {
    uint bits;        // code width, 1..8
    uint slots;       // 16-column slots in the span
    uint col0;        // first padded column
    uint tile_word0;  // word offset (within a row) of the tile holding the first slot
    uint t0;          // index of the first slot inside that tile
};

static inline float scale_of(uint p) {
    return float(as_type<half>(ushort(p & 0xffffu)));
}

template <int M>
kernel void bitsmith_gemv(device const uint* words [[buffer(0)]],
                          device const uint* params [[buffer(1)]],
                          device const Span* spans [[buffer(2)]],
                          constant int& n_spans [[buffer(3)]],
                          constant int& row_words [[buffer(4)]],
                          device const float* x [[buffer(5)]],
                          constant int& kp [[buffer(6)]],
                          device float* y [[buffer(7)]],
                          constant int& n [[buffer(8)]],
                          uint gid [[thread_position_in_grid]],
                          uint lane [[thread_index_in_simdgroup]]) {
    const int row = int(gid >> 5);
    if (row >= n) return;
    const uint half_id = lane >> 4, l16 = lane & 15;
    device const uint* rw = words + ulong(row) * row_words;
    float tot[M];
    for (int m = 0; m < M; ++m) tot[m] = 0.f;
    for (int si = 0; si < n_spans; ++si) {
        const Span sp = spans[si];
        const uint p = params[ulong(row) * n_spans + si];
        const float s = scale_of(p), z = float(p >> 16);
        const uint spt = 32u / sp.bits, mask = (1u << sp.bits) - 1u;
        float acc[M];
        for (int m = 0; m < M; ++m) acc[m] = 0.f;
        for (uint i = half_id; i < sp.slots; i += 2) {
            const uint slot = sp.t0 + i, tile = slot / spt, t = slot - tile * spt;
            const uint w = rw[sp.tile_word0 + tile * 16u + l16];
            const float q = float((w >> (t * sp.bits)) & mask) - z;
            const int col = int(sp.col0 + i * 16u + l16);
            for (int m = 0; m < M; ++m) acc[m] = fma(q, x[ulong(m) * kp + col], acc[m]);
        }
        for (int m = 0; m < M; ++m) tot[m] = fma(acc[m], s, tot[m]);
    }
    for (int m = 0; m < M; ++m) {
        const float v = simd_sum(tot[m]);
        if (lane == 0) y[ulong(m) * n + row] = v;
    }
}

#define BITSMITH_GEMV(M) \
    template [[host_name("bitsmith_gemv_m" #M)]] kernel void bitsmith_gemv<M>( \
        device const uint*, device const uint*, device const Span*, constant int&, \
        constant int&, device const float*, constant int&, device float*, constant int&, \
        uint, uint);
BITSMITH_GEMV(1)
BITSMITH_GEMV(2)
BITSMITH_GEMV(3)
BITSMITH_GEMV(4)
BITSMITH_GEMV(5)
BITSMITH_GEMV(6)
BITSMITH_GEMV(7)
BITSMITH_GEMV(8)

#define BM 64  // batch rows per threadgroup
#define BN 64  // output rows per threadgroup
#define BK 16  // one slot per step

// slot_span[g] = the span holding padded slot g (kp / 16 entries).
kernel void bitsmith_gemm(device const uint* words [[buffer(0)]],
                          device const uint* params [[buffer(1)]],
                          device const Span* spans [[buffer(2)]],
                          device const uint* slot_span [[buffer(3)]],
                          constant int& n_spans [[buffer(4)]],
                          constant int& row_words [[buffer(5)]],
                          device const float* x [[buffer(6)]],
                          constant int& m [[buffer(7)]],
                          constant int& kp [[buffer(8)]],
                          device float* y [[buffer(9)]],
                          constant int& n [[buffer(10)]],
                          uint2 tg [[threadgroup_position_in_grid]],
                          uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float xs[BK][BM + 4];
    threadgroup float ws[BK][BN + 4];
    const int tx = int(tid & 15), ty = int(tid >> 4);
    const int m0 = int(tg.y) * BM, n0 = int(tg.x) * BN;
    float c[4][4];
    for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) c[a][b] = 0.f;
    for (int k0 = 0; k0 < kp; k0 += BK) {
        for (int e = int(tid); e < BM * BK; e += 256) {
            const int i = e / BK, k = e % BK, gi = m0 + i;
            xs[k][i] = gi < m ? x[ulong(gi) * kp + k0 + k] : 0.f;
        }
        const int g = k0 / BK, si = int(slot_span[g]);
        const Span sp = spans[si];
        const uint spt = 32u / sp.bits, mask = (1u << sp.bits) - 1u;
        const uint slot = sp.t0 + uint(g) - sp.col0 / 16u;
        const uint tile = slot / spt, t = slot - tile * spt;
        for (int e = int(tid); e < BN * BK; e += 256) {
            const int j = e / BK, k = e % BK, gj = n0 + j;
            float v = 0.f;
            if (gj < n) {
                const uint p = params[ulong(gj) * n_spans + si];
                const uint w = words[ulong(gj) * row_words + sp.tile_word0 + tile * 16u + k];
                v = scale_of(p) * (float((w >> (t * sp.bits)) & mask) - float(p >> 16));
            }
            ws[k][j] = v;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int k = 0; k < BK; ++k) {
            float a[4], b[4];
            for (int r = 0; r < 4; ++r) {
                a[r] = xs[k][ty * 4 + r];
                b[r] = ws[k][tx * 4 + r];
            }
            for (int r = 0; r < 4; ++r)
                for (int q = 0; q < 4; ++q) c[r][q] = fma(a[r], b[q], c[r][q]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (int r = 0; r < 4; ++r) {
        const int gi = m0 + ty * 4 + r;
        if (gi >= m) continue;
        for (int q = 0; q < 4; ++q) {
            const int gj = n0 + tx * 4 + q;
            if (gj < n) y[ulong(gi) * n + gj] = c[r][q];
        }
    }
}
