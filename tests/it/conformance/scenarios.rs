//! The scenarios every sink passes (see the crate doc).

use std::time::Duration;

use crate::conformance::rig::{Reply, Rig, Upstream, check_complete};

pub async fn ack<U: Upstream>(up: &U) {
    let mut rig = Rig::new(350).await;
    rig.start(up, 100);
    rig.until_drained().await;
    let dups = check_complete(&up.received(), 350, &[]);
    assert_eq!(dups, 0);
    assert_eq!(rig.cursor(), 350, "the stored cursor");
    let p = rig.status.progress();
    assert_eq!(p.delivered, 350);
    assert_eq!(p.batches, 4, "batches of at most 100");
    assert_eq!(p.attempts, 4);
    assert!(rig.dead_letters().is_empty());
    rig.stop().await;
    assert!(rig.supervisor.failures().is_empty());
}

pub async fn retry<U: Upstream>(up: &U) {
    let mut rig = Rig::new(150).await;
    up.script(vec![Reply::Retry(None); 3]);
    rig.start(up, 100);
    rig.until_drained().await;
    assert_eq!(check_complete(&up.received(), 150, &[]), 0);
    let p = rig.status.progress();
    assert_eq!(p.attempts, 5, "three refused, then two batches");
    assert_eq!(p.consecutive_failures, 0, "reset by the delivery");
    assert!(p.last_error.is_some(), "the refusal is kept as last error");
    assert!(rig.dead_letters().is_empty(), "a retry never dead-letters");
    rig.stop().await;
}

pub async fn retry_after<U: Upstream>(up: &U) {
    let mut rig = Rig::new(10).await;
    let after = Duration::from_secs(2);
    up.script(vec![Reply::Retry(Some(after))]);
    let started = tokio::time::Instant::now();
    rig.start(up, 100);
    rig.until_drained().await;
    let took = started.elapsed();
    assert!(
        took >= after,
        "delivered {took:?} after the start, before Retry-After ({after:?}) had passed"
    );
    assert_eq!(check_complete(&up.received(), 10, &[]), 0);
    rig.stop().await;
}

pub async fn named_reject<U: Upstream>(up: &U) {
    let mut rig = Rig::new(100).await;
    up.script(vec![Reply::Reject(Some(6))]);
    rig.start(up, 100);
    rig.until_drained().await;
    assert_eq!(check_complete(&up.received(), 100, &[7]), 0);
    let dead = rig.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, 7);
    assert!(!dead[0].1.is_empty(), "a dead letter keeps the reason");
    let p = rig.status.progress();
    assert_eq!(p.dead_letters, 1);
    assert_eq!(p.delivered, 99);
    assert_eq!(p.attempts, 3, "the batch, the part before, the part after");
    rig.stop().await;
}

pub async fn bisect<U: Upstream>(up: &U) {
    let mut rig = Rig::new(20).await;
    // Batch 1..=8 refused as a whole; halves: 1..=4 taken, 5..=8 refused;
    // 5..=6 taken, 7..=8 refused; 7 refused alone: the poison event.
    up.script(vec![
        Reply::Reject(None),
        Reply::Ack,
        Reply::Reject(None),
        Reply::Ack,
        Reply::Reject(None),
        Reply::Reject(None),
    ]);
    rig.start(up, 8);
    rig.until_drained().await;
    assert_eq!(check_complete(&up.received(), 20, &[7]), 0);
    let dead = rig.dead_letters();
    assert_eq!(dead.iter().map(|d| d.0).collect::<Vec<_>>(), vec![7]);
    rig.stop().await;
}

pub async fn timeout<U: Upstream>(up: &U) {
    let mut rig = Rig::new(120).await;
    up.script(vec![Reply::Timeout]);
    let started = tokio::time::Instant::now();
    rig.start(up, 100);
    rig.until_drained().await;
    assert!(started.elapsed() >= up.timeout());
    // An upstream that took the batch after the sink gave up holds it
    // twice: the same ids, which is what deduplication upstream is for.
    let dups = check_complete(&up.received(), 120, &[]);
    assert!(
        dups <= 100,
        "only the batch that timed out may arrive twice"
    );
    assert!(rig.dead_letters().is_empty());
    assert_eq!(rig.cursor(), 120);
    rig.stop().await;
}

pub async fn slow<U: Upstream>(up: &U) {
    let mut rig = Rig::new(300).await;
    up.script(vec![Reply::Slow(Duration::from_millis(300)); 3]);
    rig.start(up, 100);
    rig.until_drained().await;
    assert_eq!(check_complete(&up.received(), 300, &[]), 0);
    assert_eq!(rig.status.progress().attempts, 3);
    rig.stop().await;
}

pub async fn stop_and_resume<U: Upstream>(up: &U) {
    let mut rig = Rig::new(1000).await;
    up.script(vec![Reply::Slow(Duration::from_millis(200)); 10]);
    rig.start(up, 100);
    rig.until("some batches delivered", |r| r.cursor() >= 200)
        .await;
    rig.stop().await;
    let at_stop = rig.cursor();
    assert!(
        (200..1000).contains(&at_stop),
        "stopped mid-backlog at {at_stop}"
    );
    assert!(!rig.status.progress().running);
    assert_eq!(
        check_complete(&up.received(), at_stop, &[]),
        0,
        "what is upstream at the stop is what the cursor says"
    );
    rig.start(up, 100);
    rig.until_drained().await;
    assert_eq!(
        check_complete(&up.received(), 1000, &[]),
        0,
        "nothing resent"
    );
    rig.stop().await;
    assert!(rig.supervisor.failures().is_empty());
}

/// Message-by-message upstreams: a partial acknowledgement moves the
/// cursor over the prefix; only the rest is sent again.
pub async fn partial_ack<U: Upstream>(up: &U) {
    let mut rig = Rig::new(100).await;
    up.script(vec![
        Reply::Partial(30),
        Reply::Partial(0),
        Reply::Partial(25),
    ]);
    rig.start(up, 100);
    rig.until_drained().await;
    assert_eq!(
        check_complete(&up.received(), 100, &[]),
        0,
        "what was acknowledged is not sent again"
    );
    let p = rig.status.progress();
    assert_eq!(p.delivered, 100);
    assert_eq!(p.attempts, 4, "100, then 70 twice, then 45");
    assert!(rig.dead_letters().is_empty());
    rig.stop().await;
}

/// Message-by-message upstreams: the events before a refused one are
/// delivered, the refused one is dead-lettered, the rest follows.
pub async fn partial_then_reject<U: Upstream>(up: &U) {
    let mut rig = Rig::new(50).await;
    up.script(vec![Reply::RejectAfter {
        acked: 20,
        index: Some(20),
    }]);
    rig.start(up, 50);
    rig.until_drained().await;
    assert_eq!(check_complete(&up.received(), 50, &[21]), 0);
    let dead = rig.dead_letters();
    assert_eq!(dead.iter().map(|d| d.0).collect::<Vec<_>>(), vec![21]);
    assert!(!dead[0].1.is_empty(), "a dead letter keeps the reason");
    let p = rig.status.progress();
    assert_eq!((p.delivered, p.dead_letters), (49, 1));
    assert_eq!(
        p.attempts, 2,
        "the batch, then what follows the refused event"
    );
    rig.stop().await;
}
