// Correctness test and timing for kernels/bitsmith_matmul.cu on a CUDA GPU.
// Reads the case files written by `cargo run --release --example gpu_cases -- DIR [--bench]`
// (random packed layers in bitsmith's layout with f64 references and error bounds), runs
// bitsmith_gemv_m{1..8} (m <= 8) or bitsmith_gemm (m > 8) on each, and checks every output
// against its bound. Benchmark cases (4096x4096) are timed instead: GB/s of weight bytes
// for GEMV, GFLOP/s for GEMM. Prints "N passed, M failed"; exits 1 on any failure.
//
//     nvcc -O3 -arch=sm_90 -o test_bitsmith kernels/test_bitsmith_matmul.cu && ./test_bitsmith DIR

#include "bitsmith_matmul.cu"

#include <dirent.h>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <algorithm>

#define CK(call)                                                                          \
    do {                                                                                  \
        cudaError_t e = (call);                                                           \
        if (e != cudaSuccess) {                                                           \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,                  \
                    cudaGetErrorString(e));                                               \
            exit(2);                                                                      \
        }                                                                                 \
    } while (0)

typedef void (*Gemv)(const uint32_t*, const uint32_t*, const Span*, int, int, const float*,
                     int, float*, int);
static const Gemv GEMV[9] = {nullptr,            bitsmith_gemv_m1, bitsmith_gemv_m2,
                             bitsmith_gemv_m3,   bitsmith_gemv_m4, bitsmith_gemv_m5,
                             bitsmith_gemv_m6,   bitsmith_gemv_m7, bitsmith_gemv_m8};

template <typename T>
static std::vector<T> take(FILE* f, size_t count) {
    std::vector<T> v(count);
    if (count && fread(v.data(), sizeof(T), count, f) != count) {
        fprintf(stderr, "truncated case file\n");
        exit(2);
    }
    return v;
}

template <typename T>
static T* upload(const std::vector<T>& v) {
    T* d = nullptr;
    CK(cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T)));
    if (!v.empty()) CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CASE_DIR\n", argv[0]);
        return 2;
    }
    std::vector<std::string> names;
    DIR* dir = opendir(argv[1]);
    if (!dir) {
        fprintf(stderr, "cannot open %s\n", argv[1]);
        return 2;
    }
    while (dirent* e = readdir(dir))
        if (strstr(e->d_name, ".bin")) names.push_back(e->d_name);
    closedir(dir);
    std::sort(names.begin(), names.end());
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s\n", prop.name);
    int passed = 0, failed = 0;
    for (const std::string& name : names) {
        FILE* f = fopen((std::string(argv[1]) + "/" + name).c_str(), "rb");
        char magic[4];
        if (!f || fread(magic, 1, 4, f) != 4 || memcmp(magic, "BSMK", 4) != 0) {
            fprintf(stderr, "%s: not a case file\n", name.c_str());
            return 2;
        }
        std::vector<uint32_t> h = take<uint32_t>(f, 7);
        const int n = h[0], kp = h[1], row_words = h[2], n_spans = h[3], m = h[4],
                  n_slots = h[5], bench = h[6];
        std::vector<uint32_t> spans = take<uint32_t>(f, (size_t)n_spans * 5);
        std::vector<uint32_t> slot_span = take<uint32_t>(f, n_slots);
        std::vector<uint32_t> words = take<uint32_t>(f, (size_t)n * row_words);
        std::vector<uint32_t> params = take<uint32_t>(f, (size_t)n * n_spans);
        std::vector<float> x = take<float>(f, (size_t)m * kp);
        std::vector<double> want = take<double>(f, (size_t)m * n);
        std::vector<double> bound = take<double>(f, (size_t)m * n);
        fclose(f);
        uint32_t *d_words = upload(words), *d_params = upload(params),
                 *d_slot = upload(slot_span);
        Span* d_spans = (Span*)upload(spans);
        float* d_x = upload(x);
        float* d_y = nullptr;
        CK(cudaMalloc(&d_y, (size_t)m * n * sizeof(float)));
        auto launch = [&]() {
            if (m <= 8) {
                GEMV[m]<<<(n + 7) / 8, 256>>>(d_words, d_params, d_spans, n_spans, row_words,
                                               d_x, kp, d_y, n);
            } else {
                dim3 grid((n + BN - 1) / BN, (m + BM - 1) / BM);
                bitsmith_gemm<<<grid, 256>>>(d_words, d_params, d_spans, d_slot, n_spans,
                                             row_words, d_x, m, kp, d_y, n);
            }
        };
        launch();
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        if (bench) {
            cudaEvent_t a, b;
            CK(cudaEventCreate(&a));
            CK(cudaEventCreate(&b));
            const int reps = 50;
            CK(cudaEventRecord(a));
            for (int i = 0; i < reps; ++i) launch();
            CK(cudaEventRecord(b));
            CK(cudaEventSynchronize(b));
            float ms = 0;
            CK(cudaEventElapsedTime(&ms, a, b));
            const double s = ms / 1e3 / reps;
            const double bytes = 4.0 * (words.size() + params.size());
            const double flops = 2.0 * m * n * (double)kp;
            printf("bench %s: %.1f us, %.1f GB/s of weights, %.1f GFLOP/s\n", name.c_str(),
                   s * 1e6, bytes / s / 1e9, flops / s / 1e9);
        } else {
            std::vector<float> y((size_t)m * n);
            CK(cudaMemcpy(y.data(), d_y, y.size() * sizeof(float), cudaMemcpyDeviceToHost));
            size_t bad = 0;
            double worst = 0;
            for (size_t i = 0; i < y.size(); ++i) {
                const double err = fabs((double)y[i] - want[i]);
                worst = std::max(worst, err / std::max(bound[i], 1e-300));
                if (!(err <= bound[i])) {
                    if (bad++ < 3)
                        fprintf(stderr, "%s: output %zu = %g, reference %g, bound %g\n",
                                name.c_str(), i, y[i], want[i], bound[i]);
                }
            }
            if (bad) failed++; else passed++;
            if (bad) printf("FAIL %s (%zu outputs out of bound)\n", name.c_str(), bad);
        }
        cudaFree(d_words); cudaFree(d_params); cudaFree(d_slot); cudaFree(d_spans);
        cudaFree(d_x); cudaFree(d_y);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
