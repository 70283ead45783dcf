//! The latency distribution as an SVG chart: one line per arm, latency against percentile on
//! the usual HdrHistogram scale (0 %, 90 %, 99 %, 99.9 %, 99.99 % evenly spaced).

use std::fmt::Write as _;

/// Percentiles are plotted up to 99.99 %: x = log10(1 / (1 - q)), 0 to 4.
pub(crate) const X_MAX: f64 = 4.0;
const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 5] = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"];

/// The quantiles a curve is sampled at, as (x, quantile).
pub(crate) fn grid() -> impl Iterator<Item = (f64, f64)> {
    (0..=80).map(|i| {
        let x = f64::from(i) * X_MAX / 80.0;
        (x, 1.0 - 10f64.powf(-x))
    })
}

/// One chart: `series` is (label, points of (x, latency in ms)).
pub(crate) fn svg(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let y_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|(_, y)| *y))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let px = |x: f64| LEFT + x / X_MAX * plot_w;
    let py = |y: f64| TOP + plot_h - y / y_max * plot_h;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    // Axes, ticks and grid lines.
    for (x, label) in [
        (0.0, "0%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
    ] {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#ddd"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle">{label}</text>"##,
            px(x),
            TOP,
            TOP + plot_h,
            TOP + plot_h + 18.0
        );
    }
    for i in 0..=5 {
        let y = y_max * f64::from(i) / 5.0;
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="#ddd"/><text x="{3:.1}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            LEFT,
            py(y),
            LEFT + plot_w,
            LEFT - 6.0,
            py(y) + 4.0,
            format_ms(y)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 10.0
    );
    let _ = writeln!(
        out,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">produce → handler entry (ms)</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    for (i, (label, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let ly = TOP + 16.0 + 16.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="{color}" stroke-width="2"/><text x="{3:.1}" y="{4:.1}">{5}</text>"#,
            LEFT + 10.0,
            ly,
            LEFT + 30.0,
            LEFT + 36.0,
            ly + 4.0,
            escape(label)
        );
    }
    out.push_str("</svg>\n");
    out
}

fn format_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_a_line_per_arm() {
        let series = vec![
            (
                "A1".to_owned(),
                grid().map(|(x, _)| (x, x * 10.0)).collect(),
            ),
            ("W".to_owned(), grid().map(|(x, _)| (x, x * 12.0)).collect()),
        ];
        let chart = svg("1000 msgs/s", &series);
        assert_eq!(chart.matches("<polyline").count(), 2);
        assert!(chart.starts_with("<svg") && chart.ends_with("</svg>\n"));
    }
}
