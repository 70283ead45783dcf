//! HTML by hand: an escaping function, the page frame, and line charts as inline SVG. Pages
//! are small and server-rendered; everything they load comes from the binary.

use super::auth::Caller;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use std::fmt::Write as _;

/// The stylesheet, served at `/assets/console.css`.
pub(crate) const CSS: &str = include_str!("assets/console.css");

/// Escapes text for HTML content and attribute values (double-quoted).
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment or query value.
pub(crate) fn url(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The navigation: path, label.
const NAV: [(&str, &str); 7] = [
    ("/", "Fleet"),
    ("/lag", "Lag and throughput"),
    ("/routes", "Routes"),
    ("/errors", "Errors"),
    ("/dlq", "Dead letters"),
    ("/parked", "Parked and outbox"),
    ("/controls", "Controls"),
];

/// A whole page: the frame, the navigation, who is signed in, and `body`. `refresh` reloads
/// it every so many seconds (pages that follow the fleet; never a page with a form to fill).
pub(crate) fn page(
    title: &str,
    caller: Option<&Caller>,
    refresh: Option<u32>,
    body: &str,
) -> Html<String> {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Weir console</title><link rel=\"stylesheet\" href=\"/assets/console.css\">",
        esc(title)
    );
    if let Some(seconds) = refresh {
        let _ = write!(out, "<meta http-equiv=\"refresh\" content=\"{seconds}\">");
    }
    out.push_str("</head><body><header><strong>Weir console</strong><nav>");
    for (path, label) in NAV {
        let current = if label == title {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(out, "<a href=\"{path}\"{current}>{label}</a>");
    }
    out.push_str("</nav>");
    if let Some(caller) = caller {
        let _ = write!(
            out,
            "<span class=\"who\">{}</span>",
            esc(caller.role.name())
        );
        if caller.session {
            let _ = write!(
                out,
                "<form method=\"post\" action=\"/logout\" class=\"inline\">{}\
                 <button>Sign out</button></form>",
                csrf_field(caller)
            );
        }
    }
    let _ = write!(
        out,
        "</header><main><h1>{}</h1>{body}</main></body></html>",
        esc(title)
    );
    Html(out)
}

/// The login form, with a message.
pub(crate) fn login_page(message: &str) -> Html<String> {
    page(
        "Sign in",
        None,
        None,
        &format!(
            "<form method=\"post\" action=\"/login\" class=\"login\"><p>{}</p>\
             <label for=\"token\">Token</label>\
             <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" autofocus>\
             <button type=\"submit\">Sign in</button></form>",
            esc(message)
        ),
    )
}

/// The hidden CSRF field of a form (empty for a bearer caller, who needs none).
pub(crate) fn csrf_field(caller: &Caller) -> String {
    caller.csrf.as_deref().map_or_else(String::new, |t| {
        format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", esc(t))
    })
}

/// An error page: what was wrong, with its status. Nothing was changed.
#[derive(Debug)]
pub(crate) struct Problem {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl Problem {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub(crate) fn internal(error: &anyhow::Error) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, format!("{error:#}"))
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = format!(
            "<p class=\"problem\" role=\"alert\">{}</p><p>Nothing was changed.</p>",
            esc(&self.message)
        );
        let title = self.status.canonical_reason().unwrap_or("Error");
        (self.status, page(title, None, None, &body)).into_response()
    }
}

/// Bytes for people: 12.3 MiB.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A time for people.
pub(crate) fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// One line of a chart.
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(DateTime<Utc>, f64)>,
}

/// Colours of the lines, in order.
const PALETTE: [&str; 8] = [
    "#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563",
];

/// A line chart of `series` over `[from, to]` (from its first point, if later), as inline SVG
/// with a legend. Every line is a
/// `<polyline>` whose `data-points` attribute says how many points it has.
pub(crate) fn chart(
    label: &str,
    series: &[Series],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> String {
    // A console that started minutes ago, or a fleet that did, has minutes to show, not an
    // hour: the axis starts at the first point (a minute at least before `to`).
    let first = series
        .iter()
        .flat_map(|s| s.points.iter().map(|(t, _)| *t))
        .min();
    let from = first
        .map_or(from, |first| first.max(from))
        .min(to - chrono::Duration::minutes(1));
    const W: f64 = 640.0;
    const H: f64 = 160.0;
    const PAD: f64 = 36.0;
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|(_, v)| *v))
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let span = (to - from).num_milliseconds().max(1) as f64;
    let x = |t: DateTime<Utc>| PAD + (t - from).num_milliseconds() as f64 / span * (W - PAD - 8.0);
    let y = |v: f64| H - 20.0 - v / max * (H - 30.0);
    let mut out = format!(
        "<figure class=\"chart\"><svg viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{}\">\
         <line x1=\"{PAD}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" class=\"axis\"/>\
         <text x=\"2\" y=\"14\" class=\"tick\">{}</text><text x=\"2\" y=\"{}\" class=\"tick\">0</text>\
         <text x=\"{PAD}\" y=\"{}\" class=\"tick\">{}</text>\
         <text x=\"{}\" y=\"{}\" class=\"tick\" text-anchor=\"end\">{}</text>",
        esc(label),
        H - 20.0,
        W - 8.0,
        H - 20.0,
        trim_number(max),
        H - 20.0,
        H - 4.0,
        from.format("%H:%M:%S"),
        W - 8.0,
        H - 4.0,
        to.format("%H:%M:%S"),
    );
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let points: Vec<String> = s
            .points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = write!(
            out,
            "<polyline class=\"series\" data-series=\"{}\" data-points=\"{}\" fill=\"none\" \
             stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            esc(&s.name),
            s.points.len(),
            points.join(" ")
        );
        // Dots where points are few (a line of one point draws nothing), and at the latest.
        let dotted = if s.points.len() <= 60 {
            &s.points[..]
        } else {
            &s.points[s.points.len() - 1..]
        };
        for (t, v) in dotted {
            let _ = write!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"/>",
                x(*t),
                y(*v)
            );
        }
    }
    out.push_str("</svg><figcaption>");
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let last = s.points.last().map_or(0.0, |(_, v)| *v);
        let _ = write!(
            out,
            "<span class=\"key\"><i style=\"background:{colour}\"></i>{} <b>{}</b></span>",
            esc(&s.name),
            trim_number(last)
        );
    }
    out.push_str("</figcaption></figure>");
    out
}

/// A number without needless decimals.
pub(crate) fn trim_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_in_text_and_attributes() {
        assert_eq!(
            esc("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(url("a b/c?d"), "a%20b%2Fc%3Fd");
    }

    #[test]
    fn a_chart_draws_one_polyline_per_series_with_its_points() {
        let t0 = Utc::now();
        let svg = chart(
            "lag",
            &[Series {
                name: "p0".into(),
                points: vec![(t0, 1.0), (t0 + chrono::Duration::seconds(5), 3.0)],
            }],
            t0,
            t0 + chrono::Duration::seconds(10),
        );
        assert!(svg.contains("data-points=\"2\""), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 1);
    }
}
