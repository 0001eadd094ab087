//! The tables and index arithmetic of the GPU kernels (`kernels/bitsmith_matmul.cu`,
//! `.metal`), checked on the CPU: `bitsmith::infer::kernels::gpu::emulate` walks the
//! layout exactly as `bitsmith_gemv_m*` (chunks, quads, 128-bit word groups, rows per warp,
//! the 2²³ code trick, the shuffle tree) and `bitsmith_gemm` do, and must match the f64
//! reference within the f32-accumulation bound on random layers (every width, group, act
//! order, mixed widths with pruned columns). This is no GPU run; it catches a wrong table or
//! index before one.

mod packed_common;

use bitsmith::infer::kernels::gpu::{emulate, gemv_rows_per_warp, GpuTables};
use bitsmith::infer::kernels::BitsmithLinear;
use bitsmith::infer::layout::PackedLayout;
use bitsmith::quant::GroupSize;
use packed_common::*;

fn check_layout(rng: &mut Rng, seed: u64, what: &str, l: &PackedLayout, w: &[f32]) {
    let t = GpuTables::new(l);
    let (n, k) = (l.out_features, l.in_features);
    for m in [1usize, 3, 8, 9] {
        let x = random_x(rng, m * k);
        let xp = l.gather_rows(&x, m);
        // the launcher's device-side gather: index-select over x with a zero column appended
        if let Some(g) = &t.gather {
            for i in 0..m {
                for (c, &j) in g.iter().enumerate() {
                    let v = if j as usize == k {
                        0.0
                    } else {
                        x[i * k + j as usize]
                    };
                    assert_eq!(xp[i * l.padded_in + c], v, "{what}: gather table");
                }
            }
        }
        let (want, mag) = reference(w, &x, n, k);
        let bound: Vec<f64> = mag.iter().map(|a| gamma(k + 8) * a).collect();
        let y = if m <= 8 {
            emulate::gemv(l, &t, &xp, m)
        } else {
            emulate::gemm(l, &t, &xp, m)
        };
        check(&format!("{what} batch {m}"), seed, &y, &want, &bound);
    }
}

#[test]
fn gpu_tables_match_reference() {
    let seed = seed();
    let mut rng = Rng(seed);
    for &(n, k) in &[(5, 40), (9, 130), (3, 576), (2, 1000)] {
        for bits in [2u8, 3, 4, 8] {
            for group in [32i64, 64, 128, -1] {
                let group = GroupSize::from_i64(group).expect("valid group");
                for act_order in [false, true] {
                    let q = random_layer(&mut rng, n, k, bits, group, !act_order, act_order);
                    let l = BitsmithLinear::from_quantized(&q).expect("repack");
                    let what = format!("{n}x{k} w{bits} g{} act={act_order}", group.as_i64());
                    check_layout(&mut rng, seed, &what, l.layout(), &q.dequantize());
                }
            }
        }
    }
    for &(n, k) in &[(5, 40), (3, 576)] {
        for widths in [&[0u8, 1, 2, 3, 4, 5, 6, 7, 8][..], &[0, 2, 4], &[3]] {
            for group_size in [None, Some(32), Some(7)] {
                let q = random_mixed(&mut rng, n, k, widths, group_size);
                let l = BitsmithLinear::from_mixed(&q).expect("repack");
                let what = format!("mixed {n}x{k} {widths:?} {group_size:?}");
                check_layout(&mut rng, seed, &what, l.layout(), &q.dequantize());
            }
        }
    }
}

#[test]
fn chunks_cover_every_slot_once() {
    let mut rng = Rng(11);
    let q = random_mixed(&mut rng, 2, 700, &[0, 1, 2, 3, 4, 5, 6, 7, 8], Some(7));
    let l = BitsmithLinear::from_mixed(&q).expect("repack");
    let l = l.layout();
    let mut seen = vec![0u32; l.padded_in / 16];
    for [word, span, col, meta] in l.gemv_chunks() {
        let (lo, hi) = ((meta >> 8) & 0xff, meta >> 16);
        assert!(lo < hi && hi <= 32 / (meta & 0xff), "slot range {lo}..{hi}");
        assert_eq!(word % 16, 0, "chunks start on a tile");
        let sp = l.spans[span as usize];
        for t in lo..hi {
            let slot = (col / 16 + t) as usize;
            assert!(
                (sp.col0 as usize / 16..(sp.col0 + 16 * sp.slots) as usize / 16).contains(&slot),
                "slot {slot} outside span {span}"
            );
            seen[slot] += 1;
        }
    }
    assert!(
        seen.iter().all(|&c| c == 1),
        "every slot in exactly one chunk"
    );
    assert_eq!(gemv_rows_per_warp(1), 8);
    assert_eq!(gemv_rows_per_warp(3), 2);
    assert_eq!(gemv_rows_per_warp(5), 1);
    assert_eq!(gemv_rows_per_warp(32), 1);
}
