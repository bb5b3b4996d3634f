//! Async replay with tokio's paused clock: timing follows the log / speed.
#![cfg(feature = "tokio")]

use std::time::Duration;

use edgefleet_can::candump::CandumpReader;
use edgefleet_can::replay::{ReplayStream, Speed};

fn next<S: futures_core::Stream + Unpin>(
    s: &mut S,
) -> impl std::future::Future<Output = Option<S::Item>> + '_ {
    std::future::poll_fn(move |cx| std::pin::Pin::new(&mut *s).poll_next(cx))
}

#[tokio::test(start_paused = true)]
async fn stream_waits_for_each_frame() {
    let log = "(100.000000) can0 123#00\n(101.000000) can0 123#01\n(103.000000) can0 123#02\nbad\n";
    let start = tokio::time::Instant::now();
    let mut s = ReplayStream::new(CandumpReader::new(log.as_bytes()), Speed::Factor(2.0));
    let mut seen = Vec::new();
    while let Some(item) = next(&mut s).await {
        match item {
            Ok(e) => seen.push((e.frame.data()[0], start.elapsed())),
            Err(e) => assert_eq!(e.line(), 4),
        }
    }
    let ms = |v| Duration::from_millis(v);
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0], (0, ms(0)));
    assert_eq!(seen[1], (1, ms(500)));
    assert_eq!(seen[2], (2, ms(1500)));
}

#[tokio::test(start_paused = true)]
async fn max_speed_does_not_wait() {
    let log = "(100.000000) can0 123#00\n(200.000000) can0 123#01\n";
    let start = tokio::time::Instant::now();
    let mut s = ReplayStream::new(CandumpReader::new(log.as_bytes()), Speed::Max);
    let mut n = 0;
    while let Some(item) = next(&mut s).await {
        item.unwrap();
        n += 1;
    }
    assert_eq!(n, 2);
    assert_eq!(start.elapsed(), Duration::ZERO);
}
