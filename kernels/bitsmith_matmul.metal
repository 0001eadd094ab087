// bitsmith packed-weight matmuls for Metal: a line-for-line twin of
// kernels/bitsmith_matmul.cu (same layout, kernel names and argument order; see that file
// and src/infer/layout.rs for the layout). A warp is a 32-wide simdgroup here.
//
// - bitsmith_gemv_m{1..8}: the CUDA file's chunked GEMV (see its header): 4-lane quads on
//   (span, tile) chunks, one 128-bit load per lane, `rpw` rows per simdgroup; threadgroups
//   of 256 threads (8 simdgroups), dispatch ceil(n / (8 * rpw)) threadgroups.
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

#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / 32)

static inline float scale_of(uint p) {
    return float(as_type<half>(ushort(p & 0xffffu)));
}

// acc[m] += sum over the chunk's codes of (code - zero) * x[m, col] for one lane's 4 words
// (columns col + 16 t + 4 q + c, c = 0..3). B is the code width.
template <int B, int M>
static inline void chunk_dot(const uint4 w, const float zb, uint t_lo, uint t_hi,
                             device const float* x, int kp, int col, thread float* acc) {
    constexpr int SPT = 32 / B;
    constexpr uint MASK = (1u << B) - 1u;
    for (int t = 0; t < SPT; ++t) {
        if (uint(t) < t_lo || uint(t) >= t_hi) continue;
        // 0x4b000000 | c is the float 2^23 + c, so (that - (2^23 + zero)) = c - zero exactly
        const float q0 = as_type<float>(0x4b000000u | ((w.x >> (t * B)) & MASK)) - zb;
        const float q1 = as_type<float>(0x4b000000u | ((w.y >> (t * B)) & MASK)) - zb;
        const float q2 = as_type<float>(0x4b000000u | ((w.z >> (t * B)) & MASK)) - zb;
        const float q3 = as_type<float>(0x4b000000u | ((w.w >> (t * B)) & MASK)) - zb;
        for (int m = 0; m < M; ++m) {
            const float4 xv = *(device const float4*)(x + ulong(m) * kp + col + 16 * t);
            acc[m] = fma(q0, xv.x, acc[m]);
            acc[m] = fma(q1, xv.y, acc[m]);
            acc[m] = fma(q2, xv.z, acc[m]);
            acc[m] = fma(q3, xv.w, acc[m]);
        }
    }
}

template <int M>
kernel void bitsmith_gemv(device const uint* words [[buffer(0)]],
                          device const uint* params [[buffer(1)]],
                          device const uint4* chunks [[buffer(2)]],
                          constant int& n_chunks [[buffer(3)]],
                          constant int& n_spans [[buffer(4)]],
                          constant int& row_words [[buffer(5)]],
                          constant int& rpw [[buffer(6)]],
                          device const float* x [[buffer(7)]],
                          constant int& kp [[buffer(8)]],
                          device float* y [[buffer(9)]],
                          constant int& n [[buffer(10)]],
                          uint tg [[threadgroup_position_in_grid]],
                          uint warp [[simdgroup_index_in_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]]) {
    const int lanes_per_row = 32 / rpw, quads_per_row = lanes_per_row / 4;
    const int sub = int(lane) / lanes_per_row;             // which of the simdgroup's rows
    const int quad = (int(lane) % lanes_per_row) >> 2, q = int(lane & 3);
    const int row = (int(tg) * GEMV_WARPS + int(warp)) * rpw + sub;
    float tot[M];
    for (int m = 0; m < M; ++m) tot[m] = 0.f;
    if (row < n) {
        device const uint* rw = words + ulong(row) * row_words + 4 * q;
        device const uint* rp = params + ulong(row) * n_spans;
        int c = quad;
        uint4 ch = uint4(0), w = uint4(0);
        if (c < n_chunks) {
            ch = chunks[c];
            w = *(device const uint4*)(rw + ch.x);
        }
        while (c < n_chunks) {
            // prefetch the next chunk's words while this one is unpacked
            const int c2 = c + quads_per_row;
            uint4 ch2 = ch, w2 = w;
            if (c2 < n_chunks) {
                ch2 = chunks[c2];
                w2 = *(device const uint4*)(rw + ch2.x);
            }
            const uint p = rp[ch.y];
            const float s = scale_of(p), zb = 8388608.f + float(p >> 16);
            const uint bits = ch.w & 0xffu, t_lo = (ch.w >> 8) & 0xffu, t_hi = ch.w >> 16;
            const int col = int(ch.z) + 4 * q;
            float acc[M];
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
            for (int m = 0; m < M; ++m) tot[m] = fma(acc[m], s, tot[m]);
            c = c2;
            ch = ch2;
            w = w2;
        }
    }
    // every lane takes part in the shuffles (rows past n contribute zeros)
    for (int m = 0; m < M; ++m) {
        float v = tot[m];
        for (ushort o = ushort(lanes_per_row >> 1); o > 0; o >>= 1) v += simd_shuffle_xor(v, o);
        if (row < n && (int(lane) % lanes_per_row) == 0) y[ulong(m) * n + row] = v;
    }
}

#define BITSMITH_GEMV(M) \
    template [[host_name("bitsmith_gemv_m" #M)]] kernel void bitsmith_gemv<M>( \
        device const uint*, device const uint*, device const uint4*, constant int&, \
        constant int&, constant int&, constant int&, device const float*, constant int&, \
        device float*, constant int&, uint, uint, uint);
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
