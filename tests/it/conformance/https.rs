//! The HTTPS sink against the project's HTTPS receiver (the same server
//! stack as the agent's listeners), its answers scripted per request.

use std::time::Duration;

use plantrelay::config::Config;
use plantrelay::demo::receiver::Scripted;
use plantrelay::sinks::ForwarderSettings;
use plantrelay::sinks::https::HttpsSink;

use crate::conformance::rig::{Reply, SINK, Upstream};
use crate::support::agent::{Harness, load_config, minimal_config_text};

/// The sink's request timeout in these scenarios.
const TIMEOUT: Duration = Duration::from_secs(1);

pub struct HttpsUpstream {
    h: Harness,
}

impl HttpsUpstream {
    pub async fn new() -> HttpsUpstream {
        HttpsUpstream {
            h: Harness::new().await,
        }
    }

    fn config(&self, batch_max_events: usize) -> Config {
        let sink = format!(
            r#"
[[sinks.https]]
name = "{SINK}"
url = "{url}"
ca_file = "{ca}"
ca_only = true
retry_initial = "50ms"
retry_max = "500ms"
timeout = "{timeout}ms"
batch_linger = "0s"
batch_max_events = {batch_max_events}
"#,
            url = self.h.receiver.url(),
            ca = self.h.paths.ca.display(),
            timeout = TIMEOUT.as_millis(),
        );
        let text = minimal_config_text("gw-conformance", &self.h.state_dir(), "127.0.0.1:0", &sink);
        load_config(self.h.dir.path(), &text)
    }
}

impl Upstream for HttpsUpstream {
    type S = HttpsSink;

    fn script(&self, replies: Vec<Reply>) {
        let answers = replies.into_iter().map(|r| match r {
            Reply::Ack => Scripted::Delay(Duration::ZERO),
            Reply::Retry(after) => Scripted::Status {
                status: 503,
                retry_after: after.map(|d| d.as_secs()),
            },
            Reply::Reject(index) => Scripted::Reject(index),
            Reply::Timeout => Scripted::Delay(TIMEOUT + Duration::from_millis(500)),
            Reply::Slow(d) => Scripted::Delay(d),
            other => panic!("an HTTPS upstream cannot answer {other:?}"),
        });
        self.h.receiver.script(answers);
    }

    fn sink(&self) -> HttpsSink {
        let cfg = self.config(100);
        HttpsSink::new(&cfg.sinks.https[0], &cfg.agent.id).unwrap()
    }

    fn settings(&self, batch_max_events: usize) -> ForwarderSettings {
        HttpsSink::settings(&self.config(batch_max_events).sinks.https[0])
    }

    fn received(&self) -> Vec<u64> {
        self.h
            .receiver
            .events()
            .iter()
            .map(|e| {
                e.sequence
                    .expect("every forwarded event carries its sequence")
            })
            .collect()
    }

    fn timeout(&self) -> Duration {
        TIMEOUT
    }
}
