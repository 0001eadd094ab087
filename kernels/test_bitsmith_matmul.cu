// Correctness test and timing of kernels/bitsmith_matmul.cu on a CUDA GPU, self-contained
// (needs only nvcc and a GPU):
//
//     nvcc -O3 -arch=sm_90 -o test_bitsmith kernels/test_bitsmith_matmul.cu && ./test_bitsmith
//
// Generates random quantized layers (2/3/4/8 bits; groups 32/64/128/-1 and partial last
// groups; act-order g_idx; mixed widths 0..8 with pruned columns), packs them with a port
// of PackedLayout::build (src/infer/layout.rs), runs bitsmith_gemv_m{1..8} (m <= 8) or
// bitsmith_gemm (m > 8) and checks every output against the f64 dequantize-then-matmul
// reference within gamma(K + 8) * sum|w*x| (f32 accumulation order only). Then times GEMV
// (GB/s of weight bytes against a measured device read bandwidth) and GEMM (GFLOP/s).
// Prints "N passed, M failed"; exits 1 on any failure.

#include "bitsmith_matmul.cu"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,                  \
                    cudaGetErrorString(e_));                                              \
            exit(2);                                                                      \
        }                                                                                 \
    } while (0)

typedef void (*Gemv)(const uint32_t*, const uint32_t*, const uint4*, int, int, int, int,
                     const float*, int, float*, int);
static const Gemv GEMV[9] = {nullptr,          bitsmith_gemv_m1, bitsmith_gemv_m2,
                             bitsmith_gemv_m3, bitsmith_gemv_m4, bitsmith_gemv_m5,
                             bitsmith_gemv_m6, bitsmith_gemv_m7, bitsmith_gemv_m8};

struct Rng {
    uint64_t s;
    uint64_t next() { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s; }
    uint64_t below(uint64_t n) { return next() % n; }
    float unit() { return (float)(next() >> 40) / 16777216.f; }
};

// A quantized layer in the library's terms: codes [n, k]; per column a group id and a width
// (0 = pruned); per group and row an f16 scale and a true zero.
struct Layer {
    int n, k, n_groups;
    std::vector<uint8_t> codes, width, zero;
    std::vector<int> group;
    std::vector<uint16_t> scale;  // f16 bits, [group][n]
};

struct Packed {
    int n, k, kp, row_words;
    std::vector<int> gather;  // -1 = padding
    std::vector<Span> spans;
    std::vector<uint32_t> words, params, slot_span;
    std::vector<uint4> chunks;  // the GEMV's work list (port of PackedLayout::gemv_chunks)
    int rpw;                    // GEMV rows per warp
};

static float f16(uint16_t b) { return __half2float(__ushort_as_half(b)); }

static Layer uniform(Rng& r, int n, int k, int bits, int g, bool sym, bool act) {
    Layer l{n, k, 0};
    int gs = g < 0 ? k : g;
    l.n_groups = (k + gs - 1) / gs;
    for (int j = 0; j < k; ++j) l.group.push_back(j / gs);
    if (act)
        for (int i = k - 1; i > 0; --i) std::swap(l.group[i], l.group[r.below(i + 1)]);
    l.width.assign(k, bits);
    for (int i = 0; i < n * k; ++i) l.codes.push_back(r.below(1u << bits));
    for (int i = 0; i < l.n_groups * n; ++i) {
        l.scale.push_back(__half_as_ushort(__float2half(0.001f + 0.05f * r.unit())));
        l.zero.push_back(sym ? 1 << (bits - 1) : r.below(1u << bits));
    }
    return l;
}

// mixed widths: the group of a column is its width (one range per row and width)
static Layer mixed(Rng& r, int n, int k) {
    Layer l{n, k, 9};
    for (int j = 0; j < k; ++j) l.width.push_back(r.below(9));
    l.group.assign(l.width.begin(), l.width.end());
    for (int i = 0; i < n * k; ++i) {
        int b = l.width[i % k];
        l.codes.push_back(b ? r.below(1u << b) : 0);
    }
    for (int g = 0; g < 9; ++g)
        for (int row = 0; row < n; ++row) {
            l.scale.push_back(__half_as_ushort(__float2half(0.001f + 0.05f * r.unit())));
            l.zero.push_back(g ? r.below(1u << g) : 0);
        }
    return l;
}

static float weight(const Layer& l, int row, int j) {
    if (!l.width[j]) return 0.f;
    int g = l.group[j];
    return f16(l.scale[g * l.n + row]) * ((float)l.codes[row * l.k + j] - (float)l.zero[g * l.n + row]);
}

// Port of PackedLayout::build: groups in id order, columns ascending inside a group,
// consecutive groups of one width form a segment of tiles.
static Packed pack(const Layer& l) {
    Packed p{l.n, l.k, 0, 0};
    std::vector<std::vector<int>> cols(l.n_groups);
    for (int j = 0; j < l.k; ++j)
        if (l.width[j]) cols[l.group[j]].push_back(j);
    std::vector<int> span_group;
    int seg_bits = -1, seg_slots = 0;
    for (int g = 0; g < l.n_groups; ++g) {
        if (cols[g].empty()) continue;
        int bits = l.width[cols[g][0]], spt = 32 / bits;
        if (bits != seg_bits) {
            if (seg_bits > 0) p.row_words += (seg_slots + 32 / seg_bits - 1) / (32 / seg_bits) * 16;
            seg_bits = bits;
            seg_slots = 0;
        }
        uint32_t slots = (cols[g].size() + 15) / 16;
        // GEMV chunks: one per tile the span touches (slots counted within the segment)
        for (uint32_t first = seg_slots, end = seg_slots + slots, tile = first / spt;
             tile * spt < end; ++tile) {
            uint32_t tf = tile * spt, lo = std::max(first, tf), hi = std::min(end, tf + spt);
            p.chunks.push_back(make_uint4((uint32_t)(p.row_words + tile * 16), (uint32_t)p.spans.size(),
                                          (uint32_t)p.gather.size() + 16 * tf - 16 * first,
                                          (uint32_t)bits | (lo - tf) << 8 | (hi - tf) << 16));
        }
        p.spans.push_back(Span{(uint32_t)bits, slots, (uint32_t)p.gather.size(),
                               (uint32_t)(p.row_words + seg_slots / spt * 16),
                               (uint32_t)(seg_slots % spt)});
        span_group.push_back(g);
        seg_slots += slots;
        for (int j : cols[g]) p.gather.push_back(j);
        while (p.gather.size() % 16) p.gather.push_back(-1);
        for (uint32_t s = 0; s < slots; ++s) p.slot_span.push_back(p.spans.size() - 1);
    }
    if (seg_bits > 0) p.row_words += (seg_slots + 32 / seg_bits - 1) / (32 / seg_bits) * 16;
    p.kp = p.gather.size();
    p.rpw = bitsmith_gemv_rows_per_warp((int)p.chunks.size());
    const int ns = p.spans.size();
    p.words.assign((size_t)l.n * p.row_words, 0);
    p.params.assign((size_t)l.n * ns, 0);
    for (int r = 0; r < l.n; ++r)
        for (int si = 0; si < ns; ++si) {
            const Span& sp = p.spans[si];
            int g = span_group[si], spt = 32 / sp.bits;
            p.params[(size_t)r * ns + si] = l.scale[g * l.n + r] | (uint32_t)l.zero[g * l.n + r] << 16;
            for (size_t i = 0; i < cols[g].size(); ++i) {
                // slot0 of the span within its segment = t0 + 16-word tiles before tile_word0
                int slot = sp.t0 + i / 16;
                size_t w = sp.tile_word0 + (slot / spt) * 16 + i % 16;
                p.words[(size_t)r * p.row_words + w] |= (uint32_t)l.codes[r * l.k + cols[g][i]] << ((slot % spt) * sp.bits);
            }
        }
    return p;
}

struct Device {
    uint32_t *words, *params, *slot_span;
    Span* spans;
    uint4* chunks;
    float *x, *y;
};

template <typename T>
static T* upload(const std::vector<T>& v) {
    T* d = nullptr;
    CK(cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T)));
    if (!v.empty()) CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

static void launch(const Packed& p, const Device& d, int m) {
    if (m <= 8) {
        const int rows_per_block = GEMV_WARPS * p.rpw;
        GEMV[m]<<<(p.n + rows_per_block - 1) / rows_per_block, GEMV_THREADS>>>(
            d.words, d.params, d.chunks, p.chunks.size(), p.spans.size(), p.row_words, p.rpw, d.x,
            p.kp, d.y, p.n);
    } else {
        dim3 grid((p.n + BN - 1) / BN, (m + BM - 1) / BM);
        bitsmith_gemm<<<grid, 256>>>(d.words, d.params, d.spans, d.slot_span, p.spans.size(),
                                     p.row_words, d.x, m, p.kp, d.y, p.n);
    }
}

static Device upload_all(const Packed& p, const std::vector<float>& xp, int m) {
    Device d{upload(p.words), upload(p.params), upload(p.slot_span), upload(p.spans),
             upload(p.chunks), upload(xp), nullptr};
    CK(cudaMalloc(&d.y, (size_t)m * p.n * sizeof(float)));
    return d;
}

static void free_all(Device& d) {
    cudaFree(d.words); cudaFree(d.params); cudaFree(d.slot_span); cudaFree(d.spans); cudaFree(d.chunks);
    cudaFree(d.x); cudaFree(d.y);
}

static std::vector<float> gathered(const Packed& p, const std::vector<float>& x, int m) {
    std::vector<float> xp((size_t)m * p.kp, 0.f);
    for (int i = 0; i < m; ++i)
        for (int c = 0; c < p.kp; ++c)
            if (p.gather[c] >= 0) xp[(size_t)i * p.kp + c] = x[(size_t)i * p.k + p.gather[c]];
    return xp;
}

// true when every output is within its bound
static bool check(const char* name, Rng& r, const Layer& l, int m) {
    Packed p = pack(l);
    std::vector<float> x((size_t)m * l.k);
    for (float& v : x) v = 2.f * r.unit() - 1.f;
    Device d = upload_all(p, gathered(p, x, m), m);
    launch(p, d, m);
    CK(cudaGetLastError());
    std::vector<float> y((size_t)m * l.n);
    CK(cudaMemcpy(y.data(), d.y, y.size() * sizeof(float), cudaMemcpyDeviceToHost));
    free_all(d);
    const double u = std::ldexp(1.0, -24), gamma = (l.k + 8) * u / (1 - (l.k + 8) * u);
    size_t bad = 0;
    for (int i = 0; i < m; ++i)
        for (int row = 0; row < l.n; ++row) {
            double s = 0, a = 0;
            for (int j = 0; j < l.k; ++j) {
                double t = (double)weight(l, row, j) * x[(size_t)i * l.k + j];
                s += t;
                a += std::fabs(t);
            }
            double got = y[(size_t)i * l.n + row];
            if (!(std::fabs(got - s) <= gamma * a) && bad++ < 3)
                fprintf(stderr, "%s: m=%d row %d: %g vs reference %g (bound %g)\n", name, i,
                        row, got, s, gamma * a);
        }
    if (bad) printf("FAIL %s (%zu outputs out of bound)\n", name, bad);
    return bad == 0;
}

__global__ void read_sum(const float4* a, size_t n, float* out) {
    float s = 0.f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float4 v = a[i];
        s += v.x + v.y + v.z + v.w;
    }
    if (s == 12345.f) *out = s;  // keeps the loads; practically never true
}

template <typename F>
static double time_s(F f, int reps) {
    f();
    CK(cudaDeviceSynchronize());
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    CK(cudaEventRecord(a));
    for (int i = 0; i < reps; ++i) f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    return ms / 1e3 / reps;
}

int main(int argc, char** argv) {
    uint64_t seed = argc > 1 ? strtoull(argv[1], nullptr, 10)
                             : (uint64_t)std::chrono::steady_clock::now().time_since_epoch().count() | 1;
    Rng r{seed};
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device %s, seed %llu (rerun: %s %llu)\n", prop.name, (unsigned long long)seed, argv[0],
           (unsigned long long)seed);
    int passed = 0, failed = 0;
    char name[128];
    const int shapes[3][2] = {{37, 40}, {577, 576}, {65, 130}};
    const int ms[5] = {1, 3, 8, 9, 64};
    for (auto& s : shapes) {
        for (int bits : {2, 3, 4, 8})
            for (int g : {32, 64, 128, -1})
                for (int act = 0; act < 2; ++act) {
                    Layer l = uniform(r, s[0], s[1], bits, g, !act, act);
                    for (int m : ms) {
                        snprintf(name, sizeof name, "%dx%d w%d g%d %s m=%d", s[0], s[1], bits, g,
                                 act ? "asym act-order" : "sym", m);
                        check(name, r, l, m) ? ++passed : ++failed;
                    }
                }
        Layer l = mixed(r, s[0], s[1]);
        for (int m : {1, 8, 64}) {
            snprintf(name, sizeof name, "%dx%d mixed m=%d", s[0], s[1], m);
            check(name, r, l, m) ? ++passed : ++failed;
        }
    }
    // bandwidth: a grid-stride read of 1 GiB
    size_t nf4 = (1ull << 30) / 16;
    float4* big;
    float* sink;
    CK(cudaMalloc(&big, nf4 * 16));
    CK(cudaMalloc(&sink, 4));
    CK(cudaMemset(big, 0, nf4 * 16));
    double bw = (nf4 * 16.0) / time_s([&] { read_sum<<<prop.multiProcessorCount * 8, 512>>>(big, nf4, sink); }, 20) / 1e9;
    cudaFree(big);
    printf("\nmeasured read bandwidth: %.0f GB/s\n", bw);
    printf("| shape (out×in) | kernel | batch | time | GB/s of weights | %% of bandwidth | GFLOP/s |\n|---|---|---|---|---|---|---|\n");
    const int bench[][4] = {{4096, 4096, 4, 128}, {4096, 4096, 3, 128}, {4096, 4096, 2, 64},
                            {4096, 4096, 8, -1},  {11008, 4096, 4, 128}, {4096, 11008, 4, 128}};
    for (auto& b : bench) {
        Layer l = uniform(r, b[0], b[1], b[2], b[3], true, false);
        Packed p = pack(l);
        for (int m : {1, 512}) {
            std::vector<float> xp((size_t)m * p.kp, 0.5f);
            Device d = upload_all(p, xp, m);
            double s = time_s([&] { launch(p, d, m); }, m == 1 ? 200 : 10);
            CK(cudaGetLastError());
            double bytes = 4.0 * (p.words.size() + p.params.size());
            printf("| %dx%d | bitsmith w%d g%d | %d | %.1f µs | %.0f | %.0f%% | %.0f |\n", b[0], b[1],
                   b[2], b[3], m, s * 1e6, bytes / s / 1e9, 100 * bytes / s / 1e9 / bw,
                   2.0 * m * b[0] * (double)b[1] / s / 1e9);
            free_all(d);
        }
    }
    printf("\n%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
