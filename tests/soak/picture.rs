//! The picture: a hand-written SVG timeline of throughput (handler invocations per second) and
//! total lag over the run, one panel each, with every fault marked as a shaded span and a
//! labelled line at its start. Broker faults (a partition left without owner) are marked too.

use crate::checker::FaultRun;
use crate::monitor::{BrokerFault, Sample};
use std::fmt::Write as _;

const WIDTH: f64 = 1100.0;
const PANEL: f64 = 210.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" upper bound for an axis.
fn ceiling(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if max <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

/// A panel: its name, colour, and the value it plots.
type Panel = (&'static str, &'static str, fn(&Sample) -> f64);

pub(crate) fn svg(
    title: &str,
    samples: &[Sample],
    faults: &[FaultRun],
    broker_faults: &[BrokerFault],
) -> String {
    let height = TOP + 2.0 * PANEL + GAP + 45.0;
    let span = samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    let plot = WIDTH - LEFT - RIGHT;
    let x = |t: f64| LEFT + t / span * plot;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let panels: [Panel; 2] = [
        ("throughput (handlings/s)", "#1f77b4", |s| s.throughput),
        ("total lag (records)", "#2ca02c", |s| s.lag as f64),
    ];
    for (i, (name, colour, value)) in panels.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL + GAP);
        let bottom = top + PANEL;
        let max = ceiling(samples.iter().map(value).fold(0.0, f64::max));
        let y = |v: f64| bottom - v / max * PANEL;
        // Faults: a shaded span and a line at the start.
        for f in faults {
            let (a, b) = (x(f.start_s), x(f.end_s.max(f.start_s + span / 400.0)));
            let _ = writeln!(
                out,
                r#"<rect x="{a:.1}" y="{top}" width="{:.1}" height="{PANEL}" fill="{}" fill-opacity="0.15"/>"#,
                b - a,
                f.kind.colour()
            );
            let _ = writeln!(
                out,
                r#"<line x1="{a:.1}" y1="{top}" x2="{a:.1}" y2="{bottom}" stroke="{}" stroke-width="1.5"/>"#,
                f.kind.colour()
            );
        }
        for b in broker_faults {
            let a = x(b.unowned_from_s);
            let e = x(b.ended_s.unwrap_or(span));
            let _ = writeln!(
                out,
                r#"<rect x="{a:.1}" y="{:.1}" width="{:.1}" height="6" fill="black"><title>broker fault: partition {} unowned</title></rect>"#,
                bottom - 6.0,
                (e - a).max(1.0),
                b.partition
            );
        }
        // Axes and grid.
        for k in 0..=4 {
            let v = max * k as f64 / 4.0;
            let gy = y(v);
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                WIDTH - RIGHT,
                LEFT - 6.0,
                gy + 4.0,
                v
            );
        }
        let _ = writeln!(
            out,
            r#"<rect x="{LEFT}" y="{top}" width="{plot}" height="{PANEL}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-weight="bold" fill="{colour}">{name}</text>"#,
            LEFT + 6.0,
            top + 14.0
        );
        let points: Vec<String> = samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.t_s), y(value(s))))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        );
        // Time axis.
        let step = ceiling(span / 10.0);
        let mut t = 0.0;
        while t <= span {
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t}s</text>"#,
                x(t),
                bottom + 14.0
            );
            t += step;
        }
    }
    // Legend: one entry per fault kind that ran, and the labels of each fault at its start.
    let legend_top = TOP + 2.0 * PANEL + GAP + 30.0;
    let mut kinds: Vec<_> = faults.iter().map(|f| f.kind).collect();
    kinds.sort();
    kinds.dedup();
    let mut lx = LEFT;
    for kind in kinds {
        let _ = writeln!(
            out,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{legend_top:.1}">{}</text>"#,
            legend_top - 10.0,
            kind.colour(),
            lx + 16.0,
            kind.label()
        );
        lx += 20.0 + 7.0 * kind.label().len() as f64 + 16.0;
    }
    if !broker_faults.is_empty() {
        let _ = writeln!(
            out,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="6" fill="black"/><text x="{:.1}" y="{legend_top:.1}">broker fault (partition without owner)</text>"#,
            legend_top - 7.0,
            lx + 16.0
        );
    }
    for (i, f) in faults.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" fill="{}" font-size="9">{}</text>"#,
            x(f.start_s) + 2.0,
            TOP + PANEL + 22.0 + (i % 3) as f64 * 10.0,
            f.kind.colour(),
            f.kind.label()
        );
    }
    out.push_str("</svg>\n");
    out
}
