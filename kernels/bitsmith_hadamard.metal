// The online Hadamard before down_proj (OSTQuant's R4) on Metal: a line-for-line twin of
// kernels/bitsmith_hadamard.cu (see it for the maths): y = x · (H_p ⊗ H_m) / √n for each
// row x of length n = p·m, H_m uploaded already scaled by 1/√n.
//
// One threadgroup of 256 threads per row: stage 1 multiplies each run of m values by H_m
// (x → y), stage 2 runs log2(p) Walsh–Hadamard butterfly stages over the run index in
// place on y, separated by device-memory barriers (a threadgroup owns its row).
//
// Not compiled or run in bitsmith's CI: the Metal compiler exists only on macOS.

#include <metal_stdlib>
using namespace metal;

#define HADAMARD_THREADS 256

kernel void bitsmith_online_hadamard(device const float* x [[buffer(0)]],      // [rows, n]
                                     device float* y [[buffer(1)]],            // [rows, n]
                                     device const float* small [[buffer(2)]],  // [m, m]
                                     constant int& p [[buffer(3)]],
                                     constant int& m [[buffer(4)]],
                                     uint row [[threadgroup_position_in_grid]],
                                     uint tid [[thread_index_in_threadgroup]]) {
    const int n = p * m;
    device const float* xr = x + ulong(row) * n;
    device float* yr = y + ulong(row) * n;

    // stage 1: each run of m values times H_m
    for (int j = int(tid); j < n; j += HADAMARD_THREADS) {
        const int run = j / m;
        const int col = j - run * m;
        device const float* xa = xr + run * m;
        float acc = 0.f;
        for (int b = 0; b < m; ++b) acc = fma(xa[b], small[b * m + col], acc);
        yr[j] = acc;
    }
    threadgroup_barrier(mem_flags::mem_device);

    // stage 2: Sylvester's H_p over the run index, butterflies on whole runs
    const int pairs = n / 2;
    for (int h = 1; h < p; h <<= 1) {
        for (int t = int(tid); t < pairs; t += HADAMARD_THREADS) {
            const int pair = t / m;
            const int col = t - pair * m;
            const int lo = (pair / h) * (2 * h) + (pair % h);  // run index with bit h clear
            const int i = lo * m + col;
            const int k = i + h * m;
            const float u = yr[i];
            const float v = yr[k];
            yr[i] = u + v;
            yr[k] = u - v;
        }
        threadgroup_barrier(mem_flags::mem_device);
    }
}
