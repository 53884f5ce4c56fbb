//! Which streams the sources can produce, and what follows for classes and
//! sink routes: sources of different classes must not be able to produce
//! the same stream (priority lanes would reorder it), and a sink's
//! `streams` filter that matches nothing the sources produce is worth a
//! warning. Patterns are MQTT-style, as in [`crate::route`]. It must never
//! refuse what it cannot foresee: HTTP ingest and Sparkplug B take their
//! streams from the data.

use crate::event::Class;

use super::Config;
use super::risk::RiskWarning;
use super::validate::Issues;

/// One level of a stream name a source can produce.
#[derive(Debug, Clone, PartialEq)]
enum Level {
    Exact(String),
    /// Any one level.
    Any,
    /// Any number of levels (at least none).
    Rest,
}

/// The stream names a source can produce, as MQTT-style patterns: OPC UA
/// node streams exactly, MQTT stream templates over their topic filters.
/// HTTP ingest and Sparkplug B take streams from the data: nothing to
/// foresee.
fn foreseeable_streams(sources: &super::SourcesConfig) -> Vec<(String, Class, Vec<Level>)> {
    let mut out = Vec::new();
    for (i, s) in sources.opcua.iter().enumerate() {
        for (j, n) in s.nodes.iter().enumerate() {
            let levels = n
                .stream
                .split('/')
                .map(|l| Level::Exact(l.to_string()))
                .collect();
            out.push((
                format!("sources.opcua[{i}].nodes[{j}].stream"),
                s.class,
                levels,
            ));
        }
    }
    for (i, s) in sources.mqtt.iter().enumerate() {
        if s.format == super::sources::MqttFormat::SparkplugB {
            continue;
        }
        for t in &s.topics {
            let filter: Vec<&str> = t.filter.split('/').collect();
            let mut levels = Vec::new();
            for part in s.stream.split('/') {
                if part == "{topic}" {
                    levels.extend(filter.iter().map(|l| match *l {
                        "+" => Level::Any,
                        "#" => Level::Rest,
                        l => Level::Exact(l.to_string()),
                    }));
                } else if part.contains("{topic}") {
                    levels.push(Level::Rest);
                } else if let Some(n) = part
                    .strip_prefix('{')
                    .and_then(|p| p.strip_suffix('}'))
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    levels.push(match filter.get(n.wrapping_sub(1)) {
                        Some(l) if *l != "+" && *l != "#" => Level::Exact(l.to_string()),
                        _ => Level::Any,
                    });
                } else if part.contains('{') {
                    levels.push(Level::Any);
                } else {
                    levels.push(Level::Exact(part.to_string()));
                }
            }
            out.push((format!("sources.mqtt[{i}].stream"), s.class, levels));
        }
    }
    out
}

/// Whether some stream name matches both patterns. A loop, not a
/// recursion per level: a pattern's length is the config's to choose.
fn overlap(a: &[Level], b: &[Level]) -> bool {
    let (mut a, mut b) = (a.iter(), b.iter());
    loop {
        match (a.next(), b.next()) {
            (Some(Level::Rest), _) | (_, Some(Level::Rest)) => return true,
            (None, None) => return true,
            (None, _) | (_, None) => return false,
            (Some(Level::Exact(p)), Some(Level::Exact(q))) if p != q => return false,
            (Some(_), Some(_)) => {}
        }
    }
}

fn show(levels: &[Level]) -> String {
    levels
        .iter()
        .map(|l| match l {
            Level::Exact(s) => s.as_str(),
            Level::Any => "+",
            Level::Rest => "#",
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A stream has one class: sources of different classes that can produce
/// the same stream name are refused, so that priority lanes never reorder
/// a stream a receiver orders by name alone.
pub(super) fn stream_classes(issues: &mut Issues<'_>, sources: &super::SourcesConfig) {
    let streams = foreseeable_streams(sources);
    for (k, (path, class, levels)) in streams.iter().enumerate() {
        let source = |p: &str| {
            p.split(".stream")
                .next()
                .unwrap_or(p)
                .split(".nodes")
                .next()
                .unwrap_or(p)
                .to_string()
        };
        if let Some((other, other_class, other_levels)) = streams[..k]
            .iter()
            .find(|(p, c, l)| c != class && source(p) != source(path) && overlap(l, levels))
        {
            issues.push(
                path.clone(),
                format!(
                    "streams \"{}\" ({class}) and \"{}\" of {} ({other_class}) can be the same stream: a stream has one class, or priority lanes may reorder it; give the sources the same class or streams of their own",
                    show(levels),
                    show(other_levels),
                    source(other),
                ),
            );
        }
    }
}

/// The sinks' stream filters that match none of the streams the sources
/// can produce (see [`super::risky_settings`]).
pub(super) fn unmatched_filters(config: &Config) -> Vec<RiskWarning> {
    let mut out = Vec::new();
    let mut warn = |key_path: String, message: String| out.push(RiskWarning { key_path, message });
    // Stream filters that match nothing the sources can produce, when
    // every source's streams can be foreseen (HTTP ingest and Sparkplug B
    // take them from the data).
    let foreseeable = config.sources.http.is_empty()
        && config
            .sources
            .mqtt
            .iter()
            .all(|s| s.format != super::sources::MqttFormat::SparkplugB);
    if foreseeable {
        let streams = foreseeable_streams(&config.sources);
        let sinks = &config.sinks;
        let routes = (sinks.https.iter().enumerate())
            .map(|(i, s)| (format!("sinks.https[{i}].streams"), &s.streams))
            .chain(
                (sinks.mqtt.iter().enumerate())
                    .map(|(i, s)| (format!("sinks.mqtt[{i}].streams"), &s.streams)),
            )
            .chain(
                (sinks.jetstream.iter().enumerate())
                    .map(|(i, s)| (format!("sinks.jetstream[{i}].streams"), &s.streams)),
            );
        for (path, filters) in routes {
            for f in filters {
                let levels: Vec<Level> = f
                    .split('/')
                    .map(|l| match l {
                        "+" => Level::Any,
                        "#" => Level::Rest,
                        l => Level::Exact(l.to_string()),
                    })
                    .collect();
                if !streams.iter().any(|(_, _, s)| overlap(s, &levels)) {
                    warn(
                        path.clone(),
                        format!(
                            "\"{f}\" matches none of the streams the sources can produce ({}): nothing reaches this sink through it",
                            streams
                                .iter()
                                .map(|(_, _, s)| show(s))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(pattern: &str) -> Vec<Level> {
        pattern
            .split('/')
            .map(|l| match l {
                "+" => Level::Any,
                "#" => Level::Rest,
                _ => Level::Exact(l.to_string()),
            })
            .collect()
    }

    #[test]
    fn patterns_overlap_where_some_name_matches_both() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/c", true),
            ("a/#", "a/c/d", true),
            ("a", "a/b", false),
            ("+/b", "a/+", true),
            ("#", "x", true),
        ];
        for (a, b, want) in cases {
            assert_eq!(overlap(&levels(a), &levels(b)), want, "{a} and {b}");
            assert_eq!(overlap(&levels(b), &levels(a)), want, "{b} and {a}");
        }
    }

    #[test]
    fn a_pattern_of_a_million_levels_is_compared_without_recursion() {
        let long = vec!["x"; 1_000_000].join("/");
        assert!(overlap(&levels(&long), &levels(&long)));
        assert!(!overlap(&levels(&long), &levels(&format!("{long}/y"))));
    }
}
