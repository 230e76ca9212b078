//! Charts drawn with plotters: `eval --plot` (KL and perplexity against bits per element, one
//! labelled point per codec setting).

use std::path::Path;

use anyhow::{bail, Context, Result};
use pagedkv_engine::eval::EvalRow;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// TrueType fonts tried in order (`PAGEDKV_FONT` first); ab_glyph renders them without a system
/// font library.
const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
];

fn load_font() -> Result<()> {
    let from_env = std::env::var("PAGEDKV_FONT").ok();
    let path = from_env
        .iter()
        .map(String::as_str)
        .chain(FONT_CANDIDATES)
        .find(|p| Path::new(p).is_file());
    let Some(path) = path else {
        bail!("no TrueType font found for the chart; set PAGEDKV_FONT to a .ttf file");
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading font {path}"))?;
    // plotters keeps fonts for the life of the process
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable TrueType font"))?;
    Ok(())
}

/// Legend entries per column below the panels.
const LEGEND_ROWS: usize = 10;
/// Height of one legend entry in pixels.
const LEGEND_LINE: u32 = 19;

/// Two panels side by side: mean KL to the f32 cache (log scale) and perplexity, both against
/// bits per element. Points carry their row's number; the legend below names each (settings'
/// names are too long, and too many sit near 2–2.5 bits, to print beside their points).
pub fn eval_chart(rows: &[EvalRow], text_name: &str, path: &Path) -> Result<()> {
    load_font()?;
    let legend_height = LEGEND_LINE * rows.len().min(LEGEND_ROWS) as u32 + 20;
    let root = BitMapBackend::new(path, (1400, 620 + legend_height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, rest) = root.split_vertically(50);
    let (body, legend) = rest.split_vertically(570);
    draw_legend(&legend, rows)?;
    title.titled(
        &format!("pagedkv eval on SmolLM2-135M: {text_name}"),
        ("sans-serif", 22),
    )?;
    let (left, right) = body.split_horizontally(700);
    let max_bits = rows.iter().map(|r| r.bits_per_element).fold(0.0, f64::max) * 1.08;
    // KL panel: the f32 row has KL 0, which a log axis cannot show
    let kl_rows: Vec<&EvalRow> = rows.iter().filter(|r| r.kl_mean > 0.0).collect();
    let kl_min = kl_rows.iter().map(|r| r.kl_mean).fold(f64::MAX, f64::min) / 3.0;
    let kl_max = kl_rows.iter().map(|r| r.kl_mean).fold(0.0, f64::max) * 3.0;
    if !kl_rows.is_empty() {
        let mut chart = ChartBuilder::on(&left)
            .margin(15)
            .caption("mean KL to the f32 cache (nats/token)", ("sans-serif", 18))
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..max_bits, (kl_min..kl_max).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("bits per element")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()?;
        draw_points(
            &mut chart,
            rows.iter()
                .enumerate()
                .filter(|(_, r)| r.kl_mean > 0.0)
                .map(|(i, r)| (i, r, r.kl_mean)),
        )?;
    }
    let ppl_min = rows.iter().map(|r| r.ppl).fold(f64::MAX, f64::min);
    let ppl_max = rows.iter().map(|r| r.ppl).fold(0.0, f64::max);
    let pad = (ppl_max - ppl_min).max(0.1) * 0.1;
    let mut chart = ChartBuilder::on(&right)
        .margin(15)
        .caption("perplexity", ("sans-serif", 18))
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_bits, (ppl_min - pad)..(ppl_max + pad))?;
    chart.configure_mesh().x_desc("bits per element").draw()?;
    draw_points(
        &mut chart,
        rows.iter().enumerate().map(|(i, r)| (i, r, r.ppl)),
    )?;
    root.present()?;
    Ok(())
}

fn draw_points<'a, X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<X, Y>>,
    points: impl Iterator<Item = (usize, &'a EvalRow, f64)>,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let font = ("sans-serif", 13).into_font().color(&BLACK);
    let points: Vec<(usize, &EvalRow, f64, String)> = points
        .map(|(i, row, y)| (i, row, y, (i + 1).to_string()))
        .collect();
    let mut at = Vec::with_capacity(points.len());
    let mut sizes = Vec::with_capacity(points.len());
    for (_, row, y, label) in &points {
        at.push(chart.backend_coord(&(row.bits_per_element, *y)));
        // the estimate leaves out descenders and runs a little short of the drawn width
        let (w, h) = chart.plotting_area().estimate_text_size(label, &font)?;
        sizes.push((w as i32 * 11 / 10 + 2, h as i32 + 5));
    }
    let (xs, ys) = chart.plotting_area().get_pixel_range();
    let area = Rect {
        left: xs.start,
        top: ys.start,
        right: xs.end,
        bottom: ys.end,
    };
    let offsets = place_labels(&at, &sizes, area);
    // one color per row, the same in both panels; a label moved away from its point gets a
    // thin line back to it
    for ((i, row, y, label), (dx, dy)) in points.into_iter().zip(offsets) {
        let color = Palette99::pick(i).to_rgba();
        let near_edge = if dx > 0 { dx - 2 } else { -POINT_GAP + 2 };
        let leader_end = if dy == LABEL_RISE {
            (0, 0)
        } else {
            (near_edge, dy - LABEL_RISE)
        };
        let point = EmptyElement::at((row.bits_per_element, y))
            + PathElement::new(vec![(0, 0), leader_end], color.mix(0.6).stroke_width(1))
            + Circle::new((0, 0), 5, color.filled())
            + Text::new(label, (dx, dy), font.clone());
        chart.draw_series(std::iter::once(point))?;
    }
    Ok(())
}

/// The legend: each row's number, color and setting, in columns of [`LEGEND_ROWS`].
fn draw_legend(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    rows: &[EvalRow],
) -> Result<()> {
    let columns = rows.len().div_ceil(LEGEND_ROWS).max(1);
    let width = area.dim_in_pixel().0 as i32 / columns as i32;
    let font = ("sans-serif", 13).into_font().color(&BLACK);
    for (i, row) in rows.iter().enumerate() {
        let x = 30 + width * (i / LEGEND_ROWS) as i32;
        let y = 10 + LEGEND_LINE as i32 * (i % LEGEND_ROWS) as i32;
        let color = Palette99::pick(i).to_rgba();
        area.draw(&Circle::new((x, y + 7), 5, color.filled()))?;
        area.draw(&Text::new(
            format!("{:>2}  {}", i + 1, short_label(&row.codecs)),
            (x + 10, y),
            font.clone(),
        ))?;
    }
    Ok(())
}

/// Pixels between a point and its label.
const POINT_GAP: i32 = 8;
/// How far above its point a label's top sits when the label is level with it.
const LABEL_RISE: i32 = -6;

/// A box in pixels.
#[derive(Debug, Clone, Copy)]
struct Rect {
    left: i32,
    top: i32,
    right: i32,
    bottom: i32,
}

impl Rect {
    fn overlaps(&self, other: &Rect) -> bool {
        self.left < other.right
            && other.left < self.right
            && self.top < other.bottom
            && other.top < self.bottom
    }

    fn inside(&self, area: &Rect) -> bool {
        self.left >= area.left
            && self.right <= area.right
            && self.top >= area.top
            && self.bottom <= area.bottom
    }
}

/// Where each label goes, as its top-left offset from its point: level with the point on its
/// right if that covers no other label or point, else the nearest free place stepping a line up
/// or down, on the right and then the left, within `area`; level on the right when nothing is
/// free. Labels are placed in the order given.
fn place_labels(points: &[(i32, i32)], sizes: &[(i32, i32)], area: Rect) -> Vec<(i32, i32)> {
    const RADIUS: i32 = 6;
    const STEPS: i32 = 14;
    let mut taken: Vec<Rect> = points
        .iter()
        .map(|&(x, y)| Rect {
            left: x - RADIUS,
            top: y - RADIUS,
            right: x + RADIUS,
            bottom: y + RADIUS,
        })
        .collect();
    let mut offsets = Vec::with_capacity(points.len());
    for (i, (&(x, y), &(w, h))) in points.iter().zip(sizes).enumerate() {
        let boxed = |dx: i32, dy: i32| Rect {
            left: x + dx,
            top: y + dy,
            right: x + dx + w,
            bottom: y + dy + h,
        };
        let free = |r: &Rect| {
            r.inside(&area)
                && taken
                    .iter()
                    .enumerate()
                    .all(|(j, t)| j == i || !r.overlaps(t))
        };
        let candidates = (0..=STEPS).flat_map(|step| {
            let line = step * (h + 1);
            let rises: Vec<i32> = if step == 0 {
                vec![0]
            } else {
                vec![-line, line]
            };
            rises.into_iter().flat_map(move |rise| {
                [
                    (POINT_GAP, LABEL_RISE + rise),
                    (-POINT_GAP - w, LABEL_RISE + rise),
                ]
            })
        });
        let chosen = candidates
            .into_iter()
            .find(|&(dx, dy)| free(&boxed(dx, dy)))
            .unwrap_or((POINT_GAP, LABEL_RISE));
        taken.push(boxed(chosen.0, chosen.1));
        offsets.push(chosen);
    }
    offsets
}

/// A setting's name with its override's layer list cut to a count
/// (`a@b:0+1+3+keynorm` → `a@b:3 layers+keynorm`), or several overrides to their number, so
/// labels stay inside the chart.
fn short_label(pair: &pagedkv_engine::eval::CodecPair) -> String {
    let overrides = &pair.layer_overrides;
    if overrides.is_empty() {
        return pair.to_string();
    }
    // the setting without its overrides prints as `base+options`
    let plain = pagedkv_engine::eval::CodecPair {
        layer_overrides: Vec::new(),
        ..pair.clone()
    }
    .to_string();
    let (base, options) = match plain.split_once('+') {
        Some((base, options)) => (base.to_string(), format!("+{options}")),
        None => (plain, String::new()),
    };
    let summary = match overrides.as_slice() {
        [one] => {
            let layers = one.layers.len();
            let plural = if layers == 1 { "" } else { "s" };
            let codecs = if one.key_codec == one.value_codec {
                one.key_codec.to_string()
            } else {
                format!("{}/{}", one.key_codec, one.value_codec)
            };
            format!("@{codecs}:{layers} layer{plural}")
        }
        many => format!(" with {} per-layer overrides", many.len()),
    };
    format!("{base}{summary}{options}")
}

#[cfg(test)]
mod tests {
    use super::{place_labels, short_label, Rect};

    /// Labels of points close together end up apart, none covering another or leaving the
    /// area; a lone point keeps its label level on its right.
    #[test]
    fn labels_of_crowded_points_do_not_overlap() {
        let area = Rect {
            left: 0,
            top: 0,
            right: 600,
            bottom: 400,
        };
        let points = [(100, 200), (102, 203), (104, 198), (98, 201), (400, 50)];
        let sizes = [(120, 13); 5];
        let offsets = place_labels(&points, &sizes, area);
        let boxes: Vec<Rect> = points
            .iter()
            .zip(&offsets)
            .map(|(&(x, y), &(dx, dy))| Rect {
                left: x + dx,
                top: y + dy,
                right: x + dx + 120,
                bottom: y + dy + 13,
            })
            .collect();
        for (i, a) in boxes.iter().enumerate() {
            assert!(a.inside(&area), "label {i} leaves the area");
            for b in &boxes[i + 1..] {
                assert!(!a.overlaps(b), "{a:?} overlaps {b:?}");
            }
        }
        assert_eq!(offsets[4], (8, -6));
    }

    fn label(name: &str) -> String {
        short_label(&name.parse().unwrap())
    }

    #[test]
    fn override_layer_lists_become_counts() {
        assert_eq!(label("int4"), "int4");
        assert_eq!(
            label("fibquant-k4n256@int8:0+1+29+keynorm+sink1"),
            "fibquant-k4n256@int8:3 layers+keynorm+sink1"
        );
        assert_eq!(label("int4@int8/f16:10"), "int4@int8/f16:1 layer");
        assert_eq!(
            label("fibquant-k4n256@int8:0+1@fibquant-k4n64:2+3+keynorm"),
            "fibquant-k4n256 with 2 per-layer overrides+keynorm"
        );
    }
}
