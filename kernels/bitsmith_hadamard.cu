// The online Hadamard before down_proj (OSTQuant's R4, `--transform down-hadamard`) on CUDA:
// y = x · (H_p ⊗ H_m) / √n for each row x of length n = p·m, where H_p is Sylvester's
// Hadamard matrix (p a power of two) and H_m a small dense Paley factor, uploaded already
// scaled by 1/√n. The GPU twin of `Hadamard::apply_row_scaled` (src/model/hadamard.rs).
//
// One block per row. Stage 1 multiplies each of the p contiguous runs of m values by H_m,
// out of place (x → y); stage 2 runs the fast Walsh–Hadamard transform over the run index
// in place on y, log2(p) butterfly stages separated by __syncthreads() (a block owns its
// row, so the barrier orders its global-memory writes). Row-vector convention:
//   (x (A ⊗ B))[a'm + b'] = Σ_{a,b} A[a][a'] · x[a m + b] · B[b][b'].
// No shared memory: rows up to 14336 (Mistral's d_ff) and beyond need no opt-in.

extern "C" __global__ void bitsmith_online_hadamard(
    const float* __restrict__ x,      // [rows, n]
    float* __restrict__ y,            // [rows, n]
    const float* __restrict__ small,  // [m, m] row-major, scaled by 1/sqrt(n)
    int p, int m)
{
    const int n = p * m;
    const float* xr = x + (size_t)blockIdx.x * n;
    float* yr = y + (size_t)blockIdx.x * n;

    // stage 1: each run of m values times H_m
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const int run = j / m;
        const int col = j - run * m;
        const float* xa = xr + run * m;
        float acc = 0.f;
        for (int b = 0; b < m; ++b) acc = fmaf(xa[b], small[b * m + col], acc);
        yr[j] = acc;
    }
    __syncthreads();

    // stage 2: Sylvester's H_p over the run index, butterflies on whole runs
    const int pairs = n / 2;
    for (int h = 1; h < p; h <<= 1) {
        for (int t = threadIdx.x; t < pairs; t += blockDim.x) {
            const int pair = t / m;              // 0 .. p/2
            const int col = t - pair * m;
            const int lo = (pair / h) * (2 * h) + (pair % h);  // run index with bit h clear
            const int i = lo * m + col;
            const int k = i + h * m;
            const float u = yr[i];
            const float v = yr[k];
            yr[i] = u + v;
            yr[k] = u - v;
        }
        __syncthreads();
    }
}
