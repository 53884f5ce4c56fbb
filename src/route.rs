//! What a sink takes of the journal: its stream filters (`streams`,
//! MQTT-style: `+` one level, `#` the rest). Pure matching; it must never
//! read the journal or know about sinks' I/O.

/// A sink's `streams` filters; no filter takes every stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamFilter {
    filters: Vec<Vec<String>>,
}

impl StreamFilter {
    /// Every stream.
    pub fn all() -> StreamFilter {
        StreamFilter::default()
    }

    /// The filters as configured (already validated, see [`check_filter`]).
    pub fn new<S: AsRef<str>>(filters: &[S]) -> StreamFilter {
        StreamFilter {
            filters: filters
                .iter()
                .map(|f| f.as_ref().split('/').map(str::to_string).collect())
                .collect(),
        }
    }

    /// Whether it takes every stream.
    pub fn is_all(&self) -> bool {
        self.filters.is_empty()
    }

    /// Whether `stream` is taken.
    pub fn matches(&self, stream: &str) -> bool {
        self.is_all() || self.filters.iter().any(|f| matches(f, stream))
    }

    /// The filters, as MQTT-style strings.
    pub fn filters(&self) -> Vec<String> {
        self.filters.iter().map(|f| f.join("/")).collect()
    }
}

fn matches(filter: &[String], stream: &str) -> bool {
    let mut levels = stream.split('/');
    for (i, f) in filter.iter().enumerate() {
        if f == "#" {
            // `a/#` takes `a` itself too, as in MQTT.
            return i == filter.len() - 1;
        }
        match levels.next() {
            Some(l) if f == "+" || f == l => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// Why `filter` is not a valid stream filter, if it is not.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err(
            "an empty filter takes nothing; leave `streams` out to take every stream".into(),
        );
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return Err(format!(
                "\"{filter}\": `#` stands alone as the last level (e.g. \"mes/#\")"
            ));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!(
                "\"{filter}\": `+` stands alone in its level (e.g. \"line3/+\")"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_in_mqtt() {
        let f = StreamFilter::new(&["line3/+", "mes/#"]);
        assert!(f.matches("line3/press07"));
        assert!(!f.matches("line3/press07/x"));
        assert!(!f.matches("line4/press07"));
        assert!(f.matches("mes"));
        assert!(f.matches("mes/line1/orders"));
        assert!(!f.matches("mesa"));
        assert!(StreamFilter::all().matches("anything/at/all"));
        assert!(StreamFilter::new(&["#"]).matches("a"));
        assert!(StreamFilter::new(&["a/b"]).matches("a/b"));
        assert!(!StreamFilter::new(&["a/b"]).matches("a"));
    }

    #[test]
    fn malformed_filters_are_named() {
        assert!(check_filter("line3/+").is_ok());
        assert!(check_filter("#").is_ok());
        assert!(check_filter("").unwrap_err().contains("empty"));
        assert!(check_filter("mes/#/x").unwrap_err().contains("last level"));
        assert!(check_filter("mes/a#").unwrap_err().contains("last level"));
        assert!(check_filter("line+/x").unwrap_err().contains("alone"));
    }
}
