//! Figures: training curves of several regimes in one figure, and a confusion matrix.
//! Drawn with plotters; the font is bundled so that a machine without fonts draws text too.

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::Result;
use crate::train::EpochMetrics;

/// One regime's curves and the colour it is drawn in.
pub struct Curves<'a> {
    /// Legend text: the regime's name.
    pub label: &'a str,
    /// Colour of both its lines (see [`regime_color`]).
    pub color: RGBColor,
    /// Its epochs, in order.
    pub history: &'a [EpochMetrics],
}

/// The classic transfer-learning colours: head-only red, full fine-tune blue, scratch
/// black, partial green.
pub fn regime_color(regime: &str) -> RGBColor {
    match regime {
        "head" => RGBColor(214, 39, 40),
        "full" => RGBColor(31, 119, 180),
        "scratch" => BLACK,
        "partial" => RGBColor(44, 160, 44),
        _ => RGBColor(148, 103, 189),
    }
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let bytes = include_bytes!("../assets/fonts/DejaVuSans.ttf");
        for style in [FontStyle::Normal, FontStyle::Bold] {
            let _ = plotters::style::register_font("sans-serif", style, bytes);
        }
    });
}

fn draw_error<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("{}: cannot draw: {e:?}", path.display())
}

/// Loss (left) and accuracy (right) against epoch; train dashed, validation solid.
pub fn plot_curves(curves: &[Curves], title: &str, png: &Path, svg: &Path) -> Result<()> {
    register_font();
    let size = (1200, 520);
    {
        let root = BitMapBackend::new(png, size).into_drawing_area();
        draw_curves(&root, curves, title).map_err(draw_error(png))?;
        root.present().map_err(draw_error(png))?;
    }
    let root = SVGBackend::new(svg, size).into_drawing_area();
    draw_curves(&root, curves, title).map_err(draw_error(svg))?;
    root.present().map_err(draw_error(svg))?;
    Ok(())
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_curves<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    curves: &[Curves],
    title: &str,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22).into_font().style(FontStyle::Bold))?;
    // Two panels, and the legend in its own column so it never covers a curve.
    let (plots, legend) = root.split_horizontally(root.dim_in_pixel().0 - 190);
    draw_legend(&legend, curves)?;
    let panels = plots.split_evenly((1, 2));
    let epochs = curves
        .iter()
        .map(|c| c.history.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let max_loss = curves
        .iter()
        .flat_map(|c| c.history.iter().flat_map(|m| [m.train_loss, m.val_loss]))
        .filter(|v| v.is_finite())
        .fold(0.1f64, f64::max)
        .min(10.0)
        * 1.05;
    type Pick = fn(&EpochMetrics) -> f64;
    let specs: [(&str, f64, Pick, Pick); 2] = [
        ("loss", max_loss, |m| m.train_loss, |m| m.val_loss),
        ("accuracy (top-1)", 1.0, |m| m.train_acc, |m| m.val_top1),
    ];
    for (panel, (ylabel, ymax, train, val)) in panels.iter().zip(specs) {
        let mut chart = ChartBuilder::on(panel)
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.8f64..epochs + 0.2, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_labels(epochs as usize + 1)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("epoch")
            .y_desc(ylabel)
            .light_line_style(RGBColor(235, 235, 235))
            .label_style(("sans-serif", 14))
            .draw()?;
        for c in curves {
            let points = |f: Pick| {
                c.history
                    .iter()
                    .map(move |m| (m.epoch as f64, f(m).min(ymax)))
            };
            let color = c.color;
            chart.draw_series(LineSeries::new(points(val), color.stroke_width(2)))?;
            chart.draw_series(DashedLineSeries::new(
                points(train),
                6,
                4,
                color.stroke_width(1),
            ))?;
        }
    }
    Ok(())
}

/// One entry per regime and line style: solid validation, dashed train.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    curves: &[Curves],
) -> DrawResult<DB> {
    let font = ("sans-serif", 14).into_font();
    let mut y = 60;
    for c in curves {
        for (kind, width) in [("val", 2), ("train", 1)] {
            let style = c.color.stroke_width(width);
            if kind == "val" {
                area.draw(&PathElement::new(vec![(10, y), (40, y)], style))?;
            } else {
                area.draw(&PathElement::new(vec![(10, y), (18, y)], style))?;
                area.draw(&PathElement::new(vec![(22, y), (30, y)], style))?;
                area.draw(&PathElement::new(vec![(34, y), (40, y)], style))?;
            }
            area.draw(&Text::new(
                format!("{} ({kind})", c.label),
                (48, y - 8),
                font.clone(),
            ))?;
            y += 22;
        }
        y += 6;
    }
    Ok(())
}

/// A confusion matrix as a heat map: rows true class, columns predicted, counts written in.
pub fn plot_confusion(matrix: &[Vec<usize>], classes: &[String], path: &Path) -> Result<()> {
    register_font();
    let n = classes.len();
    let cell = (480 / n.max(1)).clamp(24, 80) as u32;
    let side = cell * n as u32;
    let root = BitMapBackend::new(path, (side + 200, side + 200)).into_drawing_area();
    let draw = || -> DrawResult<BitMapBackend> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "confusion matrix (rows: true, columns: predicted)",
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(80)
            .y_label_area_size(110)
            .build_cartesian_2d(0..n, 0..n)?;
        let label = |i: &usize| classes.get(*i).cloned().unwrap_or_default();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(n)
            .y_labels(n)
            .x_label_formatter(&label)
            .y_label_formatter(&|i| n.checked_sub(i + 1).map(|r| label(&r)).unwrap_or_default())
            .label_style(("sans-serif", 12))
            .draw()?;
        for (t, row) in matrix.iter().enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f64;
            for (p, &count) in row.iter().enumerate() {
                let share = count as f64 / total;
                let shade = (255.0 * (1.0 - share)) as u8;
                let y = n - 1 - t;
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(p, y), (p + 1, y + 1)],
                    RGBColor(shade, shade, 255).filled(),
                )))?;
                let color = if share > 0.5 { WHITE } else { BLACK };
                chart.draw_series(std::iter::once(Text::new(
                    count.to_string(),
                    (p, y + 1),
                    ("sans-serif", 14).into_font().color(&color),
                )))?;
            }
        }
        Ok(())
    };
    draw().map_err(draw_error(path))?;
    root.present().map_err(draw_error(path))?;
    Ok(())
}
