//! The sink conformance suite: every sink of this project must pass it.
//!
//! Each scenario appends events to a real journal, runs a real forwarder
//! against a sink whose upstream answers from a script (ack, partial ack,
//! retry with and without `Retry-After`, rejection with and without the
//! event named, timeout, slowness, a panic), and checks what matters: what
//! the upstream kept and in which order, the cursor, the dead letters and
//! the forwarder's status.
//!
//! - [`fake`]: a scripted in-process sink, under paused tokio time; it also
//!   answers what only message-by-message upstreams can (partial
//!   acknowledgements) and what no real sink should do (panic).
//! - [`https`]: the HTTPS sink against the project's HTTPS receiver, in
//!   real time.
//! - [`mqtt`]: the MQTT sink against a scripted MQTT 5 broker, in real
//!   time.

mod fake;
mod https;
#[cfg(feature = "interop")]
mod jetstream;
mod mqtt;
mod rig;
mod scenarios;

/// Generates one test per common scenario for an upstream kind.
macro_rules! conformance {
    ($kind:ident, $make:expr, $($flavor:tt)*) => {
        mod $kind {
            use crate::conformance::scenarios;

            #[tokio::test($($flavor)*)]
            async fn acks_deliver_everything_in_order_and_move_the_cursor() {
                scenarios::ack(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_retry_without_retry_after_resends_the_same_events() {
                scenarios::retry(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_retry_after_is_honoured() {
                scenarios::retry_after(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_named_rejection_dead_letters_exactly_that_event() {
                scenarios::named_reject(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn an_unnamed_rejection_is_bisected_to_the_poison_event() {
                scenarios::bisect(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_timeout_resends_and_loses_nothing() {
                scenarios::timeout(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_slow_upstream_loses_nothing_and_keeps_order() {
                scenarios::slow(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_stop_mid_backlog_resumes_at_the_cursor_without_resending() {
                scenarios::stop_and_resume(&$make).await
            }
        }
    };
}

/// Generates one test per scenario that an upstream acknowledging each
/// message (MQTT, JetStream) can play: it cannot name no event (bisection)
/// nor ask for a delay (`Retry-After`), and it acknowledges prefixes.
macro_rules! per_event_conformance {
    ($kind:ident, $make:expr, $($flavor:tt)*) => {
        mod $kind {
            use crate::conformance::scenarios;

            #[tokio::test($($flavor)*)]
            async fn acks_deliver_everything_in_order_and_move_the_cursor() {
                scenarios::ack(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_lost_connection_resends_the_same_events() {
                scenarios::retry(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_partial_ack_moves_the_cursor_over_the_prefix() {
                scenarios::partial_ack(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_refused_event_is_dead_lettered_after_the_acknowledged_prefix() {
                scenarios::partial_then_reject(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_timeout_resends_and_loses_nothing() {
                scenarios::timeout(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_slow_upstream_loses_nothing_and_keeps_order() {
                scenarios::slow(&$make).await
            }

            #[tokio::test($($flavor)*)]
            async fn a_stop_mid_backlog_resumes_at_the_cursor_without_resending() {
                scenarios::stop_and_resume(&$make).await
            }
        }
    };
}

conformance!(
    fake_sink,
    crate::conformance::fake::FakeUpstream::new(),
    start_paused = true
);
conformance!(
    https_sink,
    crate::conformance::https::HttpsUpstream::new().await,
    flavor = "multi_thread",
    worker_threads = 2
);
per_event_conformance!(
    mqtt_sink,
    crate::conformance::mqtt::MqttUpstream::new().await,
    flavor = "multi_thread",
    worker_threads = 2
);
