//! The table at the end of a run and the SVG plot of throughput and latency against offered load.

use std::fmt::Write as _;

/// One line of the table: a figure, its baseline from the same run, their ratio, the target.
pub struct Row {
    pub name: String,
    pub value: String,
    pub baseline: String,
    pub ratio: Option<f64>,
    pub target: String,
}

pub fn row(name: impl Into<String>, value: impl Into<String>) -> Row {
    Row {
        name: name.into(),
        value: value.into(),
        baseline: String::new(),
        ratio: None,
        target: String::new(),
    }
}

impl Row {
    pub fn against(mut self, baseline: impl Into<String>, ratio: f64) -> Self {
        self.baseline = baseline.into();
        self.ratio = Some(ratio);
        self
    }

    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = target.into();
        self
    }
}

/// A titled group of rows.
pub struct Section {
    pub title: String,
    pub rows: Vec<Row>,
}

pub fn table(header: &[String], sections: &[Section]) -> String {
    let mut out = String::new();
    for h in header {
        let _ = writeln!(out, "{h}");
    }
    let w = sections
        .iter()
        .flat_map(|s| &s.rows)
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(20)
        .max(20);
    let vw = sections
        .iter()
        .flat_map(|s| &s.rows)
        .map(|r| r.value.chars().count().max(r.baseline.chars().count()))
        .max()
        .unwrap_or(12)
        .max(12);
    for s in sections {
        let _ = writeln!(out, "\n{}", s.title);
        let _ = writeln!(
            out,
            "  {:<w$}  {:>vw$}  {:>vw$}  {:>6}  target",
            "figure", "value", "baseline", "ratio"
        );
        for r in &s.rows {
            let ratio = r.ratio.map_or(String::new(), |x| format!("{x:.2}"));
            let _ = writeln!(
                out,
                "  {:<w$}  {:>vw$}  {:>vw$}  {:>6}  {}",
                r.name, r.value, r.baseline, ratio, r.target
            );
        }
    }
    out
}

/// One offered load of the latency sweep.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub offered: f64,
    pub delivered: f64,
    /// p50, p99, p99.9 in ms: hookfleet publish → sink, and the bare consumer's publish → consume.
    pub hf_ms: [f64; 3],
    pub bare_ms: [f64; 3],
}

/// Two panels side by side: delivered vs offered msg/s (with a dashed line at each of `lines`, e.g.
/// the serial limit L and the sweep's 100%; those at 0 are left out), and p50/p99 latency (log scale)
/// vs offered, hookfleet and the bare consumer.
pub fn svg(points: &[Point], lines: &[(f64, &str)], title: &str) -> String {
    let lines: Vec<(f64, &str)> = lines
        .iter()
        .copied()
        .filter(|(v, _)| v.is_finite() && *v > 0.0)
        .collect();
    let (pw, ph, m) = (420.0, 300.0, 60.0);
    let width = 2.0 * pw + 3.0 * m;
    let height = ph + 2.0 * m;
    let xmax = points
        .iter()
        .map(|p| p.offered)
        .chain(lines.iter().map(|l| l.0))
        .fold(0.0, f64::max)
        * 1.05;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        width / 2.0,
        esc(title)
    );
    // Left: throughput.
    let (x0, y0) = (m, m + ph);
    let sx = |v: f64| x0 + v / xmax * pw;
    let sy = |v: f64| y0 - v / xmax * ph;
    axes(&mut s, x0, y0, pw, ph, "offered msg/s", "delivered msg/s");
    for i in 0..=4 {
        let v = xmax * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{:.0}</text><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}</text>"#,
            sx(v),
            y0 + 16.0,
            v,
            x0 - 4.0,
            sy(v) + 4.0,
            v
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#bbb" stroke-dasharray="4"/>"##,
        sx(0.0),
        sy(0.0),
        sx(xmax),
        sy(xmax)
    );
    for (&(v, name), color) in lines.iter().zip(["#c33", "#36c", "#393", "#963"].iter().cycle()) {
        let _ = writeln!(
            s,
            r#"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-dasharray="6 3"/><text x="{:.1}" y="{:.1}" fill="{color}" text-anchor="end">{name} {v:.0}</text>"#,
            x0 + pw,
            x0 + pw - 4.0,
            sy(v) - 4.0,
            y = sy(v)
        );
    }
    polyline(
        &mut s,
        points.iter().map(|p| (sx(p.offered), sy(p.delivered))),
        "#36c",
    );
    // Right: latency, log scale from 0.1 ms.
    let x1 = 2.0 * m + pw;
    let lmax = points
        .iter()
        .flat_map(|p| [p.hf_ms[1], p.bare_ms[1]])
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let (lo, hi) = (0.1f64.log10(), (lmax * 2.0).log10().ceil());
    let lx = |v: f64| x1 + v / xmax * pw;
    let ly = |ms: f64| y0 - (ms.max(0.1).log10() - lo) / (hi - lo) * ph;
    axes(&mut s, x1, y0, pw, ph, "offered msg/s", "latency ms (log)");
    for i in 0..=4 {
        let v = xmax * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{:.0}</text>"#,
            lx(v),
            y0 + 16.0,
            v
        );
    }
    let mut d = lo;
    while d <= hi + 1e-9 {
        let ms = 10f64.powf(d);
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><line x1="{x1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/>"##,
            x1 - 4.0,
            ly(ms) + 4.0,
            if ms < 1.0 {
                format!("{ms:.1}")
            } else {
                format!("{ms:.0}")
            },
            x1 + pw,
            y = ly(ms)
        );
        d += 1.0;
    }
    let series = [
        ("hookfleet p50", 0, false, "#36c", "none"),
        ("hookfleet p99", 1, false, "#36c", "6 3"),
        ("bare consumer p50", 0, true, "#999", "none"),
        ("bare consumer p99", 1, true, "#999", "6 3"),
    ];
    for (k, (name, q, bare, color, dash)) in series.iter().enumerate() {
        let pts = points.iter().filter_map(|p| {
            let v = if *bare { p.bare_ms[*q] } else { p.hf_ms[*q] };
            v.is_finite().then(|| (lx(p.offered), ly(v)))
        });
        polyline_dashed(&mut s, pts, color, dash);
        let ky = m + 14.0 + 16.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ky:.1}" x2="{:.1}" y2="{ky:.1}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
            x1 + 10.0,
            x1 + 34.0,
            x1 + 40.0,
            ky + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn axes(s: &mut String, x0: f64, y0: f64, w: f64, h: f64, xl: &str, yl: &str) {
    let _ = writeln!(
        s,
        r##"<path d="M{x0},{:.1} L{x0},{y0} L{:.1},{y0}" fill="none" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{xl}</text><text x="{:.1}" y="{:.1}" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{yl}</text>"##,
        y0 - h,
        x0 + w,
        x0 + w / 2.0,
        y0 + 36.0,
        x0 - 46.0,
        y0 - h / 2.0,
        x0 - 46.0,
        y0 - h / 2.0
    );
}

fn polyline(s: &mut String, pts: impl Iterator<Item = (f64, f64)>, color: &str) {
    polyline_dashed(s, pts, color, "none");
}

fn polyline_dashed(s: &mut String, pts: impl Iterator<Item = (f64, f64)>, color: &str, dash: &str) {
    let pts: Vec<(f64, f64)> = pts.collect();
    let list: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ = writeln!(
        s,
        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
        list.join(" ")
    );
    for (x, y) in pts {
        let _ = writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#);
    }
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
