//! Hadamard matrices of the orders transformer widths need, and their fast application.
//!
//! An order `n = 2^k · m` is built as `H_{2^k} ⊗ H_m`: Sylvester's `H_{2^k}` (applied by the
//! fast Walsh–Hadamard transform) times a small dense `H_m` from a Paley construction over
//! the finite field GF(q), q a prime power (m = q + 1 for q ≡ 3 mod 4, m = 2(q + 1) for
//! q ≡ 1 mod 4). That covers 576 = 16·36, 1536 = 128·12, 896 = 32·28, 960 = 16·60,
//! 5120 = 256·20, 14336 = 512·28, 11008 = 32·344 (q = 7³; 172 itself is not a Paley order)
//! and every power of two; an order with no such factorisation is an error naming it.

use anyhow::{bail, Result};

/// A Hadamard matrix `H` of order `n = 2^k · m` (entries ±1, `H Hᵀ = n I`).
#[derive(Debug, Clone, PartialEq)]
pub struct Hadamard {
    /// `2^k`, the Sylvester factor.
    pow2: usize,
    /// The dense factor `H_m`, row-major `[m, m]` (`[1]` when `n` is a power of two).
    small: Vec<f32>,
    m: usize,
}

impl Hadamard {
    /// The Hadamard matrix of order `n`, or an error when no construction here reaches it.
    pub fn new(n: usize) -> Result<Self> {
        if n == 0 {
            bail!("a Hadamard matrix needs a positive order");
        }
        // The largest power-of-two factor whose cofactor has a construction: the smallest
        // dense factor, the cheapest to apply (11008 = 32·344 from GF(7³), not 2·5504 from
        // the prime 5503).
        let mut pow2 = 1usize << n.trailing_zeros();
        while pow2 >= 1 {
            let m = n / pow2;
            if let Some(small) = small_hadamard(m) {
                return Ok(Self { pow2, small, m });
            }
            pow2 /= 2;
        }
        bail!(
            "no Hadamard matrix of order {n} can be built here (orders 2^k·m with m = 1, 2, q+1 \
             for a prime power q ≡ 3 mod 4, or 2(q+1) for a prime power q ≡ 1 mod 4)"
        )
    }

    pub fn order(&self) -> usize {
        self.pow2 * self.m
    }

    /// `(p, m)`: `H = H_p ⊗ H_m`, `p` a power of two.
    pub fn factors(&self) -> (usize, usize) {
        (self.pow2, self.m)
    }

    /// The dense factor `H_m`, row-major `[m, m]`.
    pub fn small_factor(&self) -> &[f32] {
        &self.small
    }

    /// Dense `H` (row-major), for tests and small orders.
    pub fn dense(&self) -> Vec<f32> {
        let n = self.order();
        let mut out = vec![0f32; n * n];
        for i in 0..n {
            let mut e = vec![0f32; n];
            e[i] = 1.0;
            self.apply_row(&mut e);
            out[i * n..(i + 1) * n].copy_from_slice(&e);
        }
        out
    }

    /// `x ← x H` for one row vector of length `n` (unnormalised).
    pub fn apply_row(&self, x: &mut [f32]) {
        self.apply_row_scaled(x, 1.0);
    }

    /// `x ← scale · x H` for one row vector of length `n`, without allocating (for `m` up
    /// to [`STACK_M`]); AVX-512 where the CPU has it.
    pub fn apply_row_scaled(&self, x: &mut [f32], scale: f32) {
        let (p, m) = (self.pow2, self.m);
        assert_eq!(
            x.len(),
            p * m,
            "a row of the Hadamard transform of order {}",
            p * m
        );
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected at run time; the length was checked above.
            unsafe { x86::apply(x, p, m, &self.small, scale) };
            return;
        }
        // SAFETY: the portable lanes need no CPU feature.
        unsafe { apply::<Portable>(x, p, m, &self.small, scale) }
    }
}

/// Widest small factor the fast transform keeps on the stack; the Paley factors of
/// transformer widths are far narrower (12, 20, 28, 36, 60, 76), a wider one borrows a heap
/// buffer per call.
pub const STACK_M: usize = 256;

/// Rows of `m` multiplied by `H_m` together: each row of `H_m` loaded serves all of them.
const ROWS: usize = 4;

/// The element loops of the transform, per instruction set.
trait Lanes {
    /// `(a, b) ← (a + b, a − b)` element-wise (`a`, `b` of one length).
    ///
    /// # Safety
    /// The CPU has the instruction set of `Self`.
    unsafe fn butterfly(a: &mut [f32], b: &mut [f32]);
    /// The first four stages of Sylvester's transform (`h` = 1, 2, 4, 8) on every 16
    /// consecutive values of `x` (`x.len()` a multiple of 16), when done in registers;
    /// `false` leaves them to [`Lanes::butterfly`].
    ///
    /// # Safety
    /// As [`Lanes::butterfly`].
    unsafe fn fwht16(x: &mut [f32]) -> bool;
    /// `out ← scale · src H_m` for each row of `m` in `src` (at most [`ROWS`] rows; `out`
    /// of the same length; `h` is `H_m` row-major).
    ///
    /// # Safety
    /// As [`Lanes::butterfly`].
    unsafe fn small_rows(src: &[f32], h: &[f32], m: usize, scale: f32, out: &mut [f32]);
    /// `x ← s · x`.
    ///
    /// # Safety
    /// As [`Lanes::butterfly`].
    unsafe fn scale(x: &mut [f32], s: f32);
}

/// `x ← scale · x (H_p ⊗ H_m)` with `x` seen as `[p, m]` row-major:
/// `(x (A ⊗ B))[a'm + b'] = Σ A[a, a'] x[a m + b] B[b, b']`, so `H_p` (Sylvester's, applied
/// by the fast Walsh–Hadamard transform) pairs whole blocks of `h·m` contiguous values and
/// `H_m` multiplies each row of `m`; the two factors commute.
///
/// # Safety
/// The CPU has the instruction set of `L`; `x.len() == p·m`, `small.len() == m·m`.
#[inline(always)]
unsafe fn apply<L: Lanes>(x: &mut [f32], p: usize, m: usize, small: &[f32], scale: f32) {
    let mut h = 1;
    if m == 1 && p >= 16 && L::fwht16(x) {
        h = 16;
    }
    while h < p {
        let len = h * m;
        for pair in x.chunks_exact_mut(2 * len) {
            let (a, b) = pair.split_at_mut(len);
            L::butterfly(a, b);
        }
        h *= 2;
    }
    if m > 1 {
        let mut stack = [0f32; ROWS * STACK_M];
        let mut heap = Vec::new();
        let src = if m <= STACK_M {
            &mut stack[..]
        } else {
            heap.resize(ROWS * m, 0f32);
            &mut heap[..]
        };
        for rows in x.chunks_mut(ROWS * m) {
            let src = &mut src[..rows.len()];
            src.copy_from_slice(rows);
            L::small_rows(src, small, m, scale, rows);
        }
    } else if scale != 1.0 {
        L::scale(x, scale);
    }
}

/// Plain loops (the compiler vectorises them for the baseline instruction set).
struct Portable;

impl Lanes for Portable {
    #[inline(always)]
    unsafe fn butterfly(a: &mut [f32], b: &mut [f32]) {
        for (u, v) in a.iter_mut().zip(b.iter_mut()) {
            (*u, *v) = (*u + *v, *u - *v);
        }
    }

    #[inline(always)]
    unsafe fn fwht16(_: &mut [f32]) -> bool {
        false
    }

    #[inline(always)]
    unsafe fn small_rows(src: &[f32], h: &[f32], m: usize, scale: f32, out: &mut [f32]) {
        for (src, out) in src.chunks_exact(m).zip(out.chunks_exact_mut(m)) {
            out.iter_mut().for_each(|o| *o = 0.0);
            for (&xb, hb) in src.iter().zip(h.chunks_exact(m)) {
                let xb = xb * scale;
                out.iter_mut().zip(hb).for_each(|(o, &hv)| *o += xb * hv);
            }
        }
    }

    #[inline(always)]
    unsafe fn scale(x: &mut [f32], s: f32) {
        x.iter_mut().for_each(|v| *v *= s);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Lanes, ROWS};
    use std::arch::x86_64::*;

    /// `out ← scale · src H_m` for `R` rows of `m`, 16 output columns at a time, each
    /// loaded row of `H_m` multiplied into all `R` rows.
    #[inline(always)]
    unsafe fn rows<const R: usize>(src: &[f32], h: &[f32], m: usize, scale: f32, out: &mut [f32]) {
        let sv = _mm512_set1_ps(scale);
        let mut c = 0;
        while c < m {
            let k = head((m - c).min(16));
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..m {
                let hv = _mm512_maskz_loadu_ps(k, h.as_ptr().add(b * m + c));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*src.get_unchecked(r * m + b)), hv, *a);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(r * m + c), k, _mm512_mul_ps(*a, sv));
            }
            c += 16;
        }
    }

    /// [`super::apply`] compiled for AVX-512F, so that the lanes below inline into it.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the lengths are as [`super::apply`] requires.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn apply(x: &mut [f32], p: usize, m: usize, small: &[f32], scale: f32) {
        super::apply::<Avx512>(x, p, m, small, scale)
    }

    struct Avx512;

    /// The lanes `0..n` of a 16-lane vector.
    #[inline(always)]
    fn head(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    impl Lanes for Avx512 {
        #[inline(always)]
        unsafe fn butterfly(a: &mut [f32], b: &mut [f32]) {
            let (pa, pb) = (a.as_mut_ptr(), b.as_mut_ptr());
            let n = a.len().min(b.len());
            let mut i = 0;
            while i + 16 <= n {
                let (u, v) = (_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
                _mm512_storeu_ps(pa.add(i), _mm512_add_ps(u, v));
                _mm512_storeu_ps(pb.add(i), _mm512_sub_ps(u, v));
                i += 16;
            }
            if i < n {
                let k = head(n - i);
                let (u, v) = (
                    _mm512_maskz_loadu_ps(k, pa.add(i)),
                    _mm512_maskz_loadu_ps(k, pb.add(i)),
                );
                _mm512_mask_storeu_ps(pa.add(i), k, _mm512_add_ps(u, v));
                _mm512_mask_storeu_ps(pb.add(i), k, _mm512_sub_ps(u, v));
            }
        }

        #[inline(always)]
        unsafe fn fwht16(x: &mut [f32]) -> bool {
            // stage h: lane l pairs with lane l ^ h; the lower one of a pair keeps the sum,
            // the upper one (bit h set) the difference partner − self
            let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let mut stages = [(lanes, 0u16); 4];
            for (stage, h) in stages.iter_mut().zip([1, 2, 4, 8]) {
                let upper = (0..16).fold(0u16, |k, l| k | (u16::from(l & h != 0) << l));
                *stage = (_mm512_xor_si512(lanes, _mm512_set1_epi32(h)), upper);
            }
            for chunk in x.chunks_exact_mut(16) {
                let mut v = _mm512_loadu_ps(chunk.as_ptr());
                for &(partner, upper) in &stages {
                    let s = _mm512_permutexvar_ps(partner, v);
                    v = _mm512_mask_sub_ps(_mm512_add_ps(v, s), upper, s, v);
                }
                _mm512_storeu_ps(chunk.as_mut_ptr(), v);
            }
            true
        }

        #[inline(always)]
        unsafe fn small_rows(src: &[f32], h: &[f32], m: usize, scale: f32, out: &mut [f32]) {
            if src.len() == ROWS * m {
                rows::<ROWS>(src, h, m, scale, out);
            } else {
                for (src, out) in src.chunks_exact(m).zip(out.chunks_exact_mut(m)) {
                    rows::<1>(src, h, m, scale, out);
                }
            }
        }

        #[inline(always)]
        unsafe fn scale(x: &mut [f32], s: f32) {
            let sv = _mm512_set1_ps(s);
            let n = x.len();
            let px = x.as_mut_ptr();
            let mut i = 0;
            while i < n {
                let k = head((n - i).min(16));
                let v = _mm512_maskz_loadu_ps(k, px.add(i));
                _mm512_mask_storeu_ps(px.add(i), k, _mm512_mul_ps(v, sv));
                i += 16;
            }
        }
    }
}

/// A dense Hadamard matrix of order `m` (row-major), if `m` is 1, 2 or a Paley order.
/// Prime fields come first, so every order they reach keeps the matrix it had before
/// prime powers were added (the matrix of an online rotation is rebuilt at every load):
/// 28 is Paley II over GF(13), not Paley I over GF(3³).
fn small_hadamard(m: usize) -> Option<Vec<f32>> {
    match m {
        1 => Some(vec![1.0]),
        2 => Some(vec![1.0, 1.0, 1.0, -1.0]),
        m if m % 4 != 0 => None,
        m => {
            let paley1_q = ((m - 1) % 4 == 3).then_some(m - 1);
            let paley2_q = ((m / 2 - 1) % 4 == 1).then_some(m / 2 - 1);
            let is_prime = |q: &usize| prime_power(*q).is_some_and(|(_, k)| k == 1);
            let h = if let Some(f) = paley1_q.filter(is_prime).and_then(Field::new) {
                paley1(&f)
            } else if let Some(f) = paley2_q.filter(is_prime).and_then(Field::new) {
                paley2(&f)
            } else if let Some(f) = paley1_q.and_then(Field::new) {
                paley1(&f)
            } else if let Some(f) = paley2_q.and_then(Field::new) {
                paley2(&f)
            } else {
                return None;
            };
            // the constructions are classical; check anyway, it costs O(m³) once
            is_hadamard(&h, m).then_some(h)
        }
    }
}

/// The finite field GF(q), q = p^k, as far as Paley's constructions need it: subtraction
/// and the quadratic character. An element is its index `0..q`, read as the base-`p`
/// digits of a polynomial of degree below `k` (for `k = 1`, the integers mod `p`).
struct Field {
    p: usize,
    k: usize,
    /// `χ(a)` for every element: 0 at zero, 1 for a nonzero square, −1 otherwise.
    character: Vec<i32>,
}

impl Field {
    /// GF(q), or `None` when `q` is not a prime power. The squares are enumerated, so the
    /// character costs O(q·k²) once; the field's modulus is the first monic irreducible
    /// polynomial of degree `k` over GF(p) (any one gives the same field).
    fn new(q: usize) -> Option<Self> {
        let (p, k) = prime_power(q)?;
        let modulus = irreducible(p, k)?;
        let mut character = vec![-1i32; q];
        character[0] = 0;
        for x in 1..q {
            let d = digits(x, p, k);
            character[from_digits(&mul_mod(&d, &d, &modulus, p), p)] = 1;
        }
        Some(Self { p, k, character })
    }

    fn order(&self) -> usize {
        self.character.len()
    }

    /// `a − b`, digit by digit mod `p`.
    fn sub(&self, a: usize, b: usize) -> usize {
        let (mut a, mut b, mut out, mut place) = (a, b, 0, 1);
        for _ in 0..self.k {
            out += (self.p + a % self.p - b % self.p) % self.p * place;
            (a, b, place) = (a / self.p, b / self.p, place * self.p);
        }
        out
    }
}

/// `(p, k)` with `q = p^k`, `p` prime, `k ≥ 1`.
fn prime_power(q: usize) -> Option<(usize, usize)> {
    let p = (2..=q).find(|d| q.is_multiple_of(*d))?;
    let (mut rest, mut k) = (q, 0);
    while rest.is_multiple_of(p) {
        rest /= p;
        k += 1;
    }
    (rest == 1).then_some((p, k))
}

/// The base-`p` digits of `x`, lowest first, `k` of them: a polynomial's coefficients.
fn digits(mut x: usize, p: usize, k: usize) -> Vec<usize> {
    (0..k)
        .map(|_| {
            let d = x % p;
            x /= p;
            d
        })
        .collect()
}

fn from_digits(d: &[usize], p: usize) -> usize {
    d.iter().rev().fold(0, |acc, &c| acc * p + c)
}

/// `a · b mod f` over GF(p); `f` monic of degree `k` (its `k + 1` coefficients, lowest
/// first), `a` and `b` of degree below `k`.
fn mul_mod(a: &[usize], b: &[usize], f: &[usize], p: usize) -> Vec<usize> {
    let k = f.len() - 1;
    let mut prod = vec![0usize; 2 * k];
    for (i, &x) in a.iter().enumerate() {
        for (j, &y) in b.iter().enumerate() {
            prod[i + j] = (prod[i + j] + x * y) % p;
        }
    }
    // reduce from the top: t·x^d ≡ −t·(f − x^k)·x^(d−k)
    for d in (k..2 * k).rev() {
        let t = prod[d];
        if t != 0 {
            for (i, &c) in f[..k].iter().enumerate() {
                prod[d - k + i] = (prod[d - k + i] + (p - c) * t) % p;
            }
            prod[d] = 0;
        }
    }
    prod.truncate(k);
    prod
}

/// The first monic irreducible polynomial of degree `k` over GF(p) (coefficients lowest
/// first), found by trial division by every monic polynomial of degree up to `k / 2`.
fn irreducible(p: usize, k: usize) -> Option<Vec<usize>> {
    let candidates = p.checked_pow(k as u32)?;
    (0..candidates)
        .map(|low| {
            let mut f = digits(low, p, k);
            f.push(1);
            f
        })
        .find(|f| {
            (1..=k / 2).all(|deg| {
                (0..p.pow(deg as u32)).all(|low| {
                    let mut g = digits(low, p, deg);
                    g.push(1);
                    !divides(&g, f, p)
                })
            })
        })
}

/// Whether monic `g` divides `f` over GF(p) (coefficients lowest first).
fn divides(g: &[usize], f: &[usize], p: usize) -> bool {
    let mut r = f.to_vec();
    let dg = g.len() - 1;
    for d in (dg..r.len()).rev() {
        let t = r[d];
        if t != 0 {
            for (i, &c) in g.iter().enumerate() {
                r[d - dg + i] = (r[d - dg + i] + (p - c) * t) % p;
            }
        }
    }
    r[..dg].iter().all(|&c| c == 0)
}

/// Jacobsthal matrix `Q[i][j] = χ(j − i)`.
fn jacobsthal(field: &Field) -> Vec<i32> {
    let q = field.order();
    (0..q * q)
        .map(|ij| field.character[field.sub(ij % q, ij / q)])
        .collect()
}

/// Paley I, order q + 1 (q ≡ 3 mod 4): `H = I + [[0, 1ᵀ], [−1, Q]]`.
fn paley1(field: &Field) -> Vec<f32> {
    let (q, jq) = (field.order(), jacobsthal(field));
    let m = q + 1;
    let mut h = vec![0f32; m * m];
    for i in 0..m {
        for j in 0..m {
            let s = match (i, j) {
                (0, 0) => 0,
                (0, _) => 1,
                (_, 0) => -1,
                _ => jq[(i - 1) * q + (j - 1)],
            };
            h[i * m + j] = (s + i32::from(i == j)) as f32;
        }
    }
    h
}

/// Paley II, order 2(q + 1) (q ≡ 1 mod 4): the symmetric conference matrix
/// `C = [[0, 1ᵀ], [1, Q]]`, each 0 replaced by `[[1, −1], [−1, −1]]` and each ±1 by
/// `±[[1, 1], [1, −1]]`.
fn paley2(field: &Field) -> Vec<f32> {
    let (q, jq) = (field.order(), jacobsthal(field));
    let c = q + 1;
    let m = 2 * c;
    let mut h = vec![0f32; m * m];
    for i in 0..c {
        for j in 0..c {
            let s = match (i, j) {
                (0, 0) => 0,
                (0, _) | (_, 0) => 1,
                _ => jq[(i - 1) * q + (j - 1)],
            };
            let block: [[i32; 2]; 2] = if s == 0 {
                [[1, -1], [-1, -1]]
            } else {
                [[s, s], [s, -s]]
            };
            for (a, row) in block.iter().enumerate() {
                for (b, &v) in row.iter().enumerate() {
                    h[(2 * i + a) * m + 2 * j + b] = v as f32;
                }
            }
        }
    }
    h
}

/// `H Hᵀ = m I` exactly (small integer arithmetic in f32 is exact).
fn is_hadamard(h: &[f32], m: usize) -> bool {
    (0..m).all(|i| {
        (0..m).all(|j| {
            let d: f32 = (0..m).map(|t| h[i * m + t] * h[j * m + t]).sum();
            d == if i == j { m as f32 } else { 0.0 }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_of_transformer_widths_are_orthogonal() {
        for n in [1, 2, 4, 12, 20, 28, 36, 44, 60, 64, 96, 576, 896, 960, 1536] {
            let h = Hadamard::new(n).unwrap_or_else(|e| panic!("order {n}: {e}"));
            assert_eq!(h.order(), n);
            let d = h.dense();
            assert!(
                d.iter().all(|&v| v == 1.0 || v == -1.0),
                "order {n}: entries ±1"
            );
            for i in 0..n {
                for j in 0..n {
                    let dot: f64 = (0..n).map(|t| (d[i * n + t] * d[j * n + t]) as f64).sum();
                    let want = if i == j { n as f64 } else { 0.0 };
                    assert_eq!(dot, want, "order {n}: rows {i}, {j}");
                }
            }
        }
    }

    /// `x (H_p ⊗ H_m)` in f64 from the closed form of Sylvester's matrix,
    /// `H_p[a][a'] = (−1)^popcount(a & a')`, independent of the fast transform.
    fn reference(h: &Hadamard, x: &[f32], scale: f64) -> Vec<f64> {
        let (p, m) = h.factors();
        let small = h.small_factor();
        (0..p * m)
            .map(|j| {
                let (a2, b2) = (j / m, j % m);
                (0..p * m)
                    .map(|i| {
                        let (a, b) = (i / m, i % m);
                        let syl = if (a & a2).count_ones() % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        };
                        x[i] as f64 * syl * small[b * m + b2] as f64
                    })
                    .sum::<f64>()
                    * scale
            })
            .collect()
    }

    #[test]
    fn fast_application_equals_the_kronecker_product_on_every_path() {
        // m = 1 below and above the 16-lane register stages, Paley factors 12, 20, 28, 36
        // and 276 (wider than the stack buffer)
        for n in [8, 16, 64, 1024, 12, 96, 80, 448, 576, 1536, 276] {
            let h = Hadamard::new(n).unwrap();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0)
                .collect();
            let scale = 1.0 / (n as f32).sqrt();
            let want = reference(&h, &x, scale as f64);
            let (p, m) = h.factors();
            let mut fast = x.clone();
            h.apply_row_scaled(&mut fast, scale);
            let mut portable = x.clone();
            // SAFETY: the portable lanes need no CPU feature; lengths are the order's
            unsafe { apply::<Portable>(&mut portable, p, m, &h.small, scale) };
            let mut plain = x.clone();
            h.apply_row(&mut plain);
            for j in 0..n {
                let tol = 1e-4 * (1.0 + want[j].abs());
                assert!((fast[j] as f64 - want[j]).abs() <= tol, "n {n} fast {j}");
                assert!(
                    (portable[j] as f64 - want[j]).abs() <= tol,
                    "n {n} portable {j}"
                );
                let unscaled = want[j] / scale as f64;
                assert!(
                    (plain[j] as f64 - unscaled).abs() <= 1e-4 * (1.0 + unscaled.abs()),
                    "n {n} unscaled {j}"
                );
            }
        }
    }

    #[test]
    fn prime_power_fields_reach_llama_widths() {
        // 11008 = 32·344 needs GF(7³); 14336 = 512·28 and GF(25)'s 52, GF(3⁵)'s 244
        for (n, want) in [
            (11008, (32, 344)),
            (14336, (512, 28)),
            (52, (1, 52)),
            (244, (1, 244)),
        ] {
            let h = Hadamard::new(n).unwrap_or_else(|e| panic!("order {n}: {e}"));
            assert_eq!(h.factors(), want, "order {n}");
            let m = want.1;
            assert!(
                is_hadamard(h.small_factor(), m),
                "order {n}: H_m H_mᵀ = m I"
            );
            assert!(h.small_factor().iter().all(|&v| v == 1.0 || v == -1.0));
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0)
                .collect();
            let scale = 1.0 / (n as f32).sqrt();
            let want = reference(&h, &x, scale as f64);
            let mut fast = x.clone();
            h.apply_row_scaled(&mut fast, scale);
            for j in 0..n {
                assert!((fast[j] as f64 - want[j]).abs() <= 1e-4 * (1.0 + want[j].abs()));
            }
        }
    }

    #[test]
    fn prime_fields_keep_their_matrices() {
        // Field::new(p) is GF(p): its character is Euler's criterion
        for p in [3usize, 5, 7, 11, 13, 43, 103] {
            let f = Field::new(p).unwrap();
            for a in 1..p {
                let euler = (0..(p - 1) / 2).fold(1usize, |r, _| r * a % p);
                let want = if euler == 1 { 1 } else { -1 };
                assert_eq!(f.character[a], want, "GF({p}) at {a}");
            }
        }
        // a prime field comes before a prime power for one order: 28 from GF(13) (Paley
        // II), not GF(3³)
        assert_eq!(
            Hadamard::new(28).unwrap().small_factor(),
            &paley2(&Field::new(13).unwrap())[..]
        );
        // and a prime power's field is a field: GF(3³)'s Paley I is Hadamard
        assert!(is_hadamard(&paley1(&Field::new(27).unwrap()), 28));
        assert!(Field::new(12).is_none() && Field::new(1).is_none());
    }

    #[test]
    fn unreachable_orders_are_named() {
        for n in [6, 172] {
            let e = Hadamard::new(n).unwrap_err().to_string();
            assert!(e.contains(&format!("order {n}")), "{e}");
        }
    }
}
