//! PNG charts of a comparison: quality against stored bits per weight (a Pareto chart),
//! and a mixed-width model's bits per layer. Drawn with plotters' bitmap backend and a font
//! embedded in the binary, so no system font or graphics library is needed.

use crate::model::spec::BLOCK_LINEARS;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// DejaVu Sans cut down to ASCII and a few symbols (`assets/fonts/README.md`).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    anyhow::ensure!(ok, "the embedded plot font could not be read");
    Ok(())
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

/// One model on the Pareto chart.
#[derive(Debug, Clone)]
pub struct ParetoPoint {
    pub label: String,
    /// Stored bits per weight of the quantized linears.
    pub bits: f64,
    pub ppl: f64,
    pub ppl_se: Option<f64>,
    pub kl: f64,
    pub kl_se: Option<f64>,
}

/// Indices of the points no other point beats on both bits and `value` (lower is better
/// for both), in increasing bits.
fn frontier(points: &[ParetoPoint], value: impl Fn(&ParetoPoint) -> f64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..points.len()).collect();
    // at equal bits the better point first, so the worse one is not on the front
    idx.sort_by(|&a, &b| {
        (points[a].bits.total_cmp(&points[b].bits))
            .then(value(&points[a]).total_cmp(&value(&points[b])))
    });
    let mut best = f64::INFINITY;
    idx.into_iter()
        .filter(|&i| {
            let v = value(&points[i]);
            let keep = v < best;
            best = best.min(v);
            keep
        })
        .collect()
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Perplexity (left) and mean KL divergence to the base (right) against stored bits per
/// weight, one labelled point per model with ±1 standard error bars and the Pareto front.
pub fn pareto_png(path: &Path, points: &[ParetoPoint], subtitle: &str) -> Result<()> {
    register_font()?;
    anyhow::ensure!(!points.is_empty(), "nothing to plot");
    let root = BitMapBackend::new(path, (1400, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            &format!("Quality against stored bits per weight ({subtitle})"),
            ("sans-serif", 22),
        )
        .map_err(err)?;
    let (left, right) = root.split_horizontally(700);
    panel(&left, points, "perplexity (lower is better)", |p| {
        (p.ppl, p.ppl_se)
    })?;
    panel(
        &right,
        points,
        "mean KL divergence to the base, nats (lower is better)",
        |p| (p.kl, p.kl_se),
    )?;
    root.present().map_err(err)?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    points: &[ParetoPoint],
    y_desc: &str,
    value: impl Fn(&ParetoPoint) -> (f64, Option<f64>),
) -> Result<()> {
    let lo_hi = |p: &ParetoPoint| {
        let (v, se) = value(p);
        (v - se.unwrap_or(0.0), v + se.unwrap_or(0.0))
    };
    let (mut y0, mut y1) = points
        .iter()
        .map(lo_hi)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (lo, hi)| {
            (a.min(lo), b.max(hi))
        });
    let pad = ((y1 - y0) * 0.08).max(1e-6);
    y0 = (y0 - pad).max(0.0);
    y1 += pad;
    let (x0, x1) = points.iter().fold((f64::INFINITY, 0f64), |(a, b), p| {
        (a.min(p.bits), b.max(p.bits))
    });
    // log₂ axis: 3-bit and 4-bit models stay apart next to a 16-bit base
    let (xa, xb) = (x0 * 0.85, x1 * 1.15);
    let mut chart = ChartBuilder::on(area)
        .margin(18)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((xa..xb).log_scale().base(2.0), y0..y1)
        .map_err(err)?;
    // enough digits to tell the ticks apart, no more
    let digits = (2.0 - (y1 - y0).log10().floor()).clamp(0.0, 5.0) as usize;
    chart
        .configure_mesh()
        .x_desc("stored bits per weight (log scale)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| format!("{y:.digits$}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    let front: Vec<(f64, f64)> = frontier(points, |p| value(p).0)
        .into_iter()
        .map(|i| (points[i].bits, value(&points[i]).0))
        .collect();
    chart
        .draw_series(LineSeries::new(
            front,
            ShapeStyle::from(&BLACK.mix(0.35)).stroke_width(2),
        ))
        .map_err(err)?;
    for (i, p) in points.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let (v, _) = value(p);
        let (lo, hi) = lo_hi(p);
        chart
            .draw_series(std::iter::once(ErrorBar::new_vertical(
                p.bits,
                lo,
                v,
                hi,
                c.stroke_width(2),
                10,
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Circle::new((p.bits, v), 6, c.filled())))
            .map_err(err)?;
        // labels of points near the right edge go to their left, inside the chart
        let right = (p.bits / xa).ln() / (xb / xa).ln() > 0.7;
        let style = ("sans-serif", 15).into_font().color(&c).pos(Pos::new(
            if right { HPos::Right } else { HPos::Left },
            VPos::Top,
        ));
        let label = EmptyElement::at((p.bits, v))
            + Text::new(p.label.clone(), (if right { -9 } else { 9 }, -22), style);
        chart.draw_series(std::iter::once(label)).map_err(err)?;
    }
    Ok(())
}

/// The decoder block of a `model.layers.N.*` module name.
fn block_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|b| b.parse().ok())
}

/// A mixed-width model's mean code bits per weight of each linear (`(module name, bits)`
/// pairs): one row per projection, one column per block, the value written in each cell.
pub fn bits_per_layer_png(path: &Path, layers: &[(String, f64)], title: &str) -> Result<()> {
    register_font()?;
    let blocks = layers
        .iter()
        .filter_map(|(name, _)| block_of(name))
        .max()
        .map_or(0, |b| b + 1);
    anyhow::ensure!(blocks > 0, "the model has no per-block layers to plot");
    let kinds: Vec<&str> = BLOCK_LINEARS
        .iter()
        .map(|s| s.rsplit('.').next().unwrap_or(s))
        .collect();
    let cells: Vec<(usize, usize, f64)> = layers
        .iter()
        .filter_map(|(name, bits)| {
            let kind = name.rsplit('.').next()?;
            let k = kinds.iter().position(|&k| k == kind)?;
            Some((block_of(name)?, k, *bits))
        })
        .collect();
    let (lo, hi) = cells
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), c| {
            (a.min(c.2), b.max(c.2))
        });
    let width = (140 + 46 * blocks).max(700) as u32;
    let root = BitMapBackend::new(path, (width, 470)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        // a segmented `0..n` has n + 1 cells (the last one for `n` itself): stop at n − 1
        .build_cartesian_2d(
            (0..blocks - 1).into_segmented(),
            (0..kinds.len() - 1).into_segmented(),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("decoder block")
        .x_labels(blocks)
        .y_labels(kinds.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(b) => b.to_string(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(k) => kinds.get(*k).copied().unwrap_or("").to_string(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(err)?;
    let centered = ("sans-serif", 12)
        .into_font()
        .into_text_style(&root)
        .pos(Pos::new(HPos::Center, VPos::Center));
    for &(b, k, bits) in &cells {
        let t = if hi > lo {
            (bits - lo) / (hi - lo)
        } else {
            0.5
        };
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(b), SegmentValue::Exact(k)),
                    (SegmentValue::Exact(b + 1), SegmentValue::Exact(k + 1)),
                ],
                heat(t).filled(),
            )))
            .map_err(err)?;
        let ink = if t > 0.6 { BLACK } else { WHITE };
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{bits:.2}"),
                (SegmentValue::CenterOf(b), SegmentValue::CenterOf(k)),
                centered.color(&ink),
            )))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Dark blue (fewest bits) through teal to yellow (most), as viridis runs.
fn heat(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 4] = [
        (68.0, 1.0, 84.0),
        (49.0, 104.0, 142.0),
        (53.0, 183.0, 121.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(bits: f64, ppl: f64) -> ParetoPoint {
        ParetoPoint {
            label: String::new(),
            bits,
            ppl,
            ppl_se: None,
            kl: 0.0,
            kl_se: None,
        }
    }

    #[test]
    fn charts_are_written_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let mut pts = vec![p(16.0, 18.0), p(4.2, 20.0), p(3.2, 25.0)];
        pts[1].ppl_se = Some(0.5);
        pts[1].kl = 0.05;
        pts[1].kl_se = Some(0.004);
        pts.iter_mut()
            .enumerate()
            .for_each(|(i, q)| q.label = format!("model {i}"));
        let pareto = dir.path().join("p.png");
        pareto_png(&pareto, &pts, "test").unwrap();
        let layers: Vec<(String, f64)> = (0..3)
            .flat_map(|b| {
                BLOCK_LINEARS.iter().enumerate().map(move |(k, name)| {
                    (
                        format!("model.layers.{b}.{name}"),
                        (300 + 10 * (b + k)) as f64 / 100.0,
                    )
                })
            })
            .collect();
        let bits = dir.path().join("b.png");
        bits_per_layer_png(&bits, &layers, "bits").unwrap();
        for (path, width) in [(&pareto, 1400u32), (&bits, 700)] {
            let png = std::fs::read(path).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            // IHDR: width, height big-endian at bytes 16..24
            assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), width);
        }
    }

    #[test]
    fn frontier_keeps_only_undominated_points() {
        // (4, 20) is beaten by (3.5, 19); (16, 18) stays: nothing smaller is as good
        let pts = [p(16.0, 18.0), p(4.0, 20.0), p(3.5, 19.0), p(3.0, 25.0)];
        assert_eq!(frontier(&pts, |q| q.ppl), vec![3, 2, 0]);
    }
}
