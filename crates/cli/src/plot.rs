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

/// Two panels side by side: mean KL to the f32 cache (log scale) and perplexity, both against
/// bits per element.
pub fn eval_chart(rows: &[EvalRow], text_name: &str, path: &Path) -> Result<()> {
    load_font()?;
    let root = BitMapBackend::new(path, (1400, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(50);
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
    // one color per row, the same in both panels; the label just right of its point
    for (i, row, y) in points {
        let color = Palette99::pick(i).to_rgba();
        let point = EmptyElement::at((row.bits_per_element, y))
            + Circle::new((0, 0), 5, color.filled())
            + Text::new(
                short_label(&row.codecs),
                (8, -6),
                ("sans-serif", 13).into_font().color(&BLACK),
            );
        chart.draw_series(std::iter::once(point))?;
    }
    Ok(())
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
    use super::short_label;

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
