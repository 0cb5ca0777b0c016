//! `accuracy.svg` and `accuracy.png`: eval accuracy against round, one line
//! and 95 % band per method, one panel per ε.
//!
//! Text is laid out with DejaVu Sans compiled into the binary (plotters'
//! `ab_glyph` font path), so plots render the same on a machine without
//! fontconfig or any installed font.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{Cell, Panel, method_label};

/// Size of one panel in pixels.
pub const PANEL_SIZE: (u32, u32) = (640, 460);
/// Panels per row before the figure wraps.
pub const MAX_COLUMNS: usize = 3;

/// The family name plotters asks for by default; registering our font under
/// it covers every text element.
const FONT: &str = "sans-serif";

/// Fixed colours, so that a method looks the same in every report.
const METHOD_COLOURS: [(&str, RGBColor); 5] = [
    ("fedsvd", RGBColor(214, 39, 40)),
    ("ffa", RGBColor(31, 119, 180)),
    ("fedavg", RGBColor(44, 160, 44)),
    ("flora", RGBColor(255, 127, 14)),
    ("fedex", RGBColor(148, 103, 189)),
];
/// Colours for methods this report does not know, in order of appearance.
const OTHER_COLOURS: [RGBColor; 4] = [
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
];
const MAJORITY_COLOUR: RGBColor = RGBColor(110, 110, 110);

/// The colour of `method`; `unknown_index` counts the unknown methods
/// drawn before it in the panel.
pub fn method_colour(method: &str, unknown_index: usize) -> RGBColor {
    METHOD_COLOURS.iter().find(|(m, _)| *m == method).map_or(
        OTHER_COLOURS[unknown_index % OTHER_COLOURS.len()],
        |(_, c)| *c,
    )
}

/// Figure size for `n` panels: up to three per row.
pub fn figure_size(n: usize) -> (u32, u32) {
    let (cols, rows) = grid(n);
    (PANEL_SIZE.0 * cols as u32, PANEL_SIZE.1 * rows as u32)
}

fn grid(n: usize) -> (usize, usize) {
    let n = n.max(1);
    let cols = n.min(MAX_COLUMNS);
    (cols, n.div_ceil(cols))
}

fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the embedded DejaVu Sans font did not load".to_string())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Writes the plot as SVG.
pub fn write_svg(panels: &[Panel], path: &Path) -> anyhow::Result<()> {
    ensure_font()?;
    let root = SVGBackend::new(path, figure_size(panels.len())).into_drawing_area();
    draw(&root, panels).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

/// Writes the plot as PNG.
pub fn write_png(panels: &[Panel], path: &Path) -> anyhow::Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, figure_size(panels.len())).into_drawing_area();
    draw(&root, panels).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, panels: &[Panel]) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let (cols, rows) = grid(panels.len());
    let areas = root.split_evenly((rows, cols));
    for (panel, area) in panels.iter().zip(&areas) {
        draw_panel(area, panel)?;
    }
    Ok(())
}

fn panel_title(panel: &Panel) -> String {
    match panel.epsilon.0 {
        None => "ε = ∞ (non-private)".to_string(),
        Some(_) => match panel.delta {
            Some(d) => format!("ε = {}, δ = {d:e}", panel.epsilon.label()),
            None => format!("ε = {}", panel.epsilon.label()),
        },
    }
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> DrawResult<DB> {
    let curves: Vec<(&Cell, Vec<(u32, super::Summary)>)> =
        panel.cells.iter().map(|c| (c, c.curve())).collect();
    let majority = panel.majority_accuracy();

    let last_round = curves
        .iter()
        .filter_map(|(_, c)| c.last().map(|(r, _)| *r))
        .max()
        .unwrap_or(1);
    let first_round = curves
        .iter()
        .filter_map(|(_, c)| c.first().map(|(r, _)| *r))
        .min()
        .unwrap_or(1)
        .min(1);
    // A single evaluated round still gets an axis of some width.
    let x_range = first_round..last_round.max(first_round + 1);

    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for (_, curve) in &curves {
        for (_, s) in curve {
            lo = lo.min(s.ci95_low().unwrap_or(s.mean));
            hi = hi.max(s.ci95_high().unwrap_or(s.mean));
        }
    }
    if let Some(m) = majority {
        lo = lo.min(m);
        hi = hi.max(m);
    }
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = (0.05 * (hi - lo)).max(0.02);
    let y_range = (lo - pad).max(0.0)..(hi + pad).min(1.0);

    let mut chart = ChartBuilder::on(area)
        .caption(panel_title(panel), (FONT, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range.clone(), y_range)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("eval accuracy (%)")
        .x_labels(10)
        .y_labels(8)
        .y_label_formatter(&|y| format!("{:.0}", 100.0 * y))
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .light_line_style(RGBColor(246, 246, 246))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;

    if let Some(m) = majority {
        chart
            .draw_series(DashedLineSeries::new(
                [(x_range.start, m), (x_range.end, m)],
                6,
                5,
                MAJORITY_COLOUR.stroke_width(1),
            ))?
            .label("majority class")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], MAJORITY_COLOUR));
    }

    let mut unknown = 0;
    for (cell, curve) in &curves {
        let colour = method_colour(&cell.method, unknown);
        if !METHOD_COLOURS.iter().any(|(m, _)| *m == cell.method) {
            unknown += 1;
        }
        // The band spans the rounds where at least two seeds evaluated;
        // a round with one seed has no interval to show.
        let band: Vec<(u32, f64, f64)> = curve
            .iter()
            .filter_map(|(r, s)| Some((*r, s.ci95_low()?, s.ci95_high()?)))
            .collect();
        if band.len() >= 2 {
            let outline: Vec<(u32, f64)> = band
                .iter()
                .map(|(r, _, h)| (*r, *h))
                .chain(band.iter().rev().map(|(r, l, _)| (*r, *l)))
                .collect();
            chart.draw_series(std::iter::once(Polygon::new(
                outline,
                colour.mix(0.18).filled(),
            )))?;
        } else if let [(r, l, h)] = band[..] {
            chart.draw_series(std::iter::once(PathElement::new(
                [(r, l), (r, h)],
                colour.mix(0.5).stroke_width(6),
            )))?;
        }
        chart
            .draw_series(LineSeries::new(
                curve.iter().map(|(r, s)| (*r, s.mean)),
                colour.stroke_width(2),
            ))?
            .label(method_label(&cell.method))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
        chart.draw_series(
            curve
                .iter()
                .map(|(r, s)| Circle::new((*r, s.mean), 3, colour.filled())),
        )?;
    }

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figure_wraps_after_three_panels() {
        assert_eq!(figure_size(1), PANEL_SIZE);
        assert_eq!(figure_size(3), (3 * PANEL_SIZE.0, PANEL_SIZE.1));
        assert_eq!(figure_size(4), (3 * PANEL_SIZE.0, 2 * PANEL_SIZE.1));
    }

    #[test]
    fn known_methods_keep_their_colour_and_unknown_ones_differ() {
        assert_eq!(method_colour("fedsvd", 7), RGBColor(214, 39, 40));
        assert_ne!(method_colour("x", 0), method_colour("y", 1));
        let known: Vec<_> = METHOD_COLOURS.iter().map(|(_, c)| *c).collect();
        assert!(OTHER_COLOURS.iter().all(|c| !known.contains(c)));
    }
}
