//! The status page (`GET /` on the health listener, same authentication as
//! the status API): the status report as one self-contained HTML page,
//! rendered on the server, no scripts and no external assets, readable on
//! a phone in the control room. With it, the backlog history of the last
//! hour that its sparklines draw.
//!
//! It only renders what [`StatusReport`] says; it must never query the
//! journal itself or show a secret (tokens and keys are not in the report).

use std::fmt::Write as _;

use crate::status::{History, StatusReport};

/// Text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

fn age(seconds: Option<f64>) -> String {
    match seconds {
        None => "–".to_owned(),
        Some(s) if s < 120.0 => format!("{s:.0} s"),
        Some(s) if s < 7200.0 => format!("{:.0} min", s / 60.0),
        Some(s) => format!("{:.1} h", s / 3600.0),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

/// An inline SVG polyline of `points` (oldest first), 120 × 24.
fn sparkline(points: &[u64]) -> String {
    if points.len() < 2 {
        return "<span class=muted title=\"sampled every 30 s\">–</span>".to_owned();
    }
    let max = points.iter().copied().max().unwrap_or(0).max(1) as f64;
    let step = 120.0 / (points.len() - 1) as f64;
    let mut path = String::new();
    for (i, p) in points.iter().enumerate() {
        let x = i as f64 * step;
        let y = 23.0 - (*p as f64 / max) * 22.0;
        let _ = write!(path, "{x:.1},{y:.1} ");
    }
    format!(
        "<svg width=120 height=24 viewBox=\"0 0 120 24\" role=img aria-label=\"backlog over the last hour, peak {peak}\"><polyline fill=none stroke=\"#2563eb\" stroke-width=1.5 points=\"{path}\"/></svg>",
        peak = max as u64
    )
}

/// The whole page.
pub fn render(r: &StatusReport, history: &History) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let state = if r.ready {
        "<span class=ok>ready</span>"
    } else {
        "<span class=bad>not ready</span>"
    };
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
<meta name=viewport content=\"width=device-width, initial-scale=1\">\
<title>plantrelay {id}</title><style>\
body{{font-family:system-ui,sans-serif;margin:1rem;color:#111}}\
table{{border-collapse:collapse;width:100%;margin-bottom:1rem}}\
th,td{{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}}\
.ok{{color:#15803d;font-weight:600}}.bad{{color:#b91c1c;font-weight:600}}.warn{{color:#b45309}}\
.muted{{color:#666;font-size:.85em}}h2{{font-size:1.1rem;margin-top:1.5rem}}\
.scroll{{overflow-x:auto}}</style></head><body>\
<h1>plantrelay {id}</h1><p>{state} · version {version} · up {uptime} · {time}</p>",
        id = esc(&r.agent_id),
        version = esc(r.version),
        uptime = age(Some(r.uptime_seconds as f64)),
        time = esc(&r.time),
    );
    if !r.not_ready_reasons.is_empty() || !r.warnings.is_empty() {
        h.push_str("<h2>Warnings</h2><ul>");
        for reason in &r.not_ready_reasons {
            let _ = write!(h, "<li class=bad>{}</li>", esc(reason));
        }
        for w in &r.warnings {
            let _ = write!(h, "<li class=warn>{}</li>", esc(&w.message));
        }
        h.push_str("</ul>");
    }

    h.push_str("<h2>Sources</h2><div class=scroll><table><tr><th>source</th><th>kind</th><th>state</th><th>events</th><th>last event</th><th>last error</th></tr>");
    for s in &r.sources {
        let state = match (s.started, s.connected) {
            (_, true) => "<span class=ok>connected</span>",
            (true, false) => "<span class=bad>disconnected</span>",
            (false, false) => "<span class=warn>starting</span>",
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{state}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            s.kind,
            s.events,
            esc(s.last_event_time.as_deref().unwrap_or("–")),
            esc(s.last_error.as_deref().unwrap_or("")),
        );
    }
    h.push_str("</table></div>");

    h.push_str("<h2>Sinks</h2><div class=scroll><table><tr><th>sink</th><th>class</th><th>state</th><th>backlog</th><th>oldest undelivered</th><th>last hour</th><th>dead letters</th><th>last error</th></tr>");
    for s in &r.sinks {
        let state = match serde_json::to_value(s.state) {
            Ok(serde_json::Value::String(v)) => v,
            _ => String::new(),
        };
        let class_state = if state == "ok" {
            format!("<span class=ok>{state}</span>")
        } else {
            format!("<span class=bad>{}</span>", esc(&state))
        };
        let mut rows: Vec<(String, u64, Option<f64>)> = s
            .classes
            .iter()
            .map(|c| {
                (
                    c.class.to_string(),
                    c.backlog_events,
                    c.oldest_undelivered_age_seconds,
                )
            })
            .collect();
        if rows.is_empty() {
            rows.push((
                "all".to_owned(),
                s.backlog_events,
                s.oldest_undelivered_age_seconds,
            ));
        }
        for (i, (class, backlog, oldest)) in rows.iter().enumerate() {
            let first = i == 0;
            let _ = write!(
                h,
                "<tr><td>{name}</td><td>{class}</td><td>{state}</td><td>{backlog}</td><td>{oldest}</td><td>{spark}</td><td>{dead}</td><td>{error}</td></tr>",
                name = if first { esc(&s.name) } else { String::new() },
                class = esc(class),
                state = if first {
                    class_state.clone()
                } else {
                    String::new()
                },
                oldest = age(*oldest),
                spark = sparkline(&history.series(&s.name, class)),
                dead = if first {
                    s.dead_letters.to_string()
                } else {
                    String::new()
                },
                error = if first {
                    esc(s.last_error.as_deref().unwrap_or(""))
                } else {
                    String::new()
                },
            );
        }
    }
    h.push_str("</table></div>");

    let j = &r.journal;
    let _ = write!(
        h,
        "<h2>Journal</h2><p>{used} of {max} ({ratio:.0} %) · head seq {head} · disk free {free} · evicted: {ec} critical, {et} telemetry{writer}</p>",
        used = mib(j.used_bytes),
        max = mib(j.max_bytes),
        ratio = j.capacity_ratio * 100.0,
        head = j.head_seq,
        free = j.disk_free_bytes.map_or("–".to_owned(), mib),
        ec = j.evicted_critical,
        et = j.evicted_telemetry,
        writer = if j.writer_alive {
            ""
        } else {
            " · <span class=bad>journal writer stopped</span>"
        },
    );
    let mut errors: Vec<(String, String, String)> = r
        .sources
        .iter()
        .filter_map(|s| {
            Some((
                s.last_error_time.clone()?,
                format!("source {}", s.name),
                s.last_error.clone()?,
            ))
        })
        .chain(r.sinks.iter().filter_map(|s| {
            Some((
                s.last_error_time.clone()?,
                format!("sink {}", s.name),
                s.last_error.clone()?,
            ))
        }))
        .collect();
    errors.sort_by(|a, b| b.0.cmp(&a.0));
    if !errors.is_empty() {
        h.push_str("<h2>Recent errors</h2><ul>");
        for (time, who, message) in errors.iter().take(10) {
            let _ = write!(
                h,
                "<li><span class=muted>{}</span> {}: {}</li>",
                esc(time),
                esc(who),
                esc(message)
            );
        }
        h.push_str("</ul>");
    }
    h.push_str("<p class=muted>JSON: <a href=\"/api/v1/status\">/api/v1/status</a> · metrics: <a href=\"/metrics\">/metrics</a></p></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<b>\"x\" & 'y'</b>"),
            "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;"
        );
    }

    #[test]
    fn a_sparkline_needs_two_points_and_scales_to_the_peak() {
        assert!(sparkline(&[5]).contains("sampled every 30 s"));
        let svg = sparkline(&[0, 10, 5]);
        assert!(
            svg.contains("points=\"0.0,23.0 60.0,1.0 120.0,12.0 \""),
            "{svg}"
        );
        assert!(svg.contains("peak 10"));
    }
}
