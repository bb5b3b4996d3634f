//! MQTT load: publishers that stamp each payload with its publish time, and
//! a subscriber that only counts and times them (the broker's own ceiling and
//! latency).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

/// A device payload as the agent's JSON decoder reads it; `timestamp_ns`
/// becomes the record's time, which is how publish→stored latency is measured.
pub fn payload(n: u64, device: u32, ts_ns: i64) -> String {
    format!(
        "{{\"n\":{n},\"timestamp_ns\":{ts_ns},\"temp\":{:.2},\"rpm\":{},\"ok\":{},\"mode\":\"{}\"}}",
        20.0 + (n % 100) as f64 / 10.0 + f64::from(device % 7),
        1200 + n % 400,
        !n.is_multiple_of(7),
        if n % 100 < 50 { "eco" } else { "boost" }
    )
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Published {
    pub messages: u64,
    pub payload_bytes: u64,
    pub seconds: f64,
}

/// Nagle's algorithm off for the harness's own clients. With it on, a
/// publisher's next PUBLISH (or the counting subscriber's next PUBACK)
/// waited behind one the broker had not acknowledged yet, for the broker's
/// delayed ACK (40 ms on Linux): the broker alone showed a p99 of 40 ms at
/// half its ceiling, and its ceiling was the subscriber's, not the
/// broker's (BENCHMARKS.md, "Nagle in the harness"). The agent's own
/// client keeps rumqttc's default (measured there too, and not adopted).
fn no_delay() -> rumqttc::NetworkOptions {
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network
}

/// The first topic level of the devices the agent subscribes to.
pub const DEVICES_ROOT: &str = "devices";

/// Publishes QoS 1 from `clients` connections over `devices` topics
/// (`<root>/dev-NNNNN/telemetry`) for `duration`, at `rate` messages/s in
/// total (None = as fast as the broker takes them), and waits until the
/// broker acknowledged every message. Another root than [`DEVICES_ROOT`],
/// of the same length, makes messages of the same size that the agent
/// never gets.
pub async fn publish(
    root: &str,
    port: u16,
    clients: usize,
    devices: u32,
    duration: Duration,
    rate: Option<f64>,
    tag: &str,
) -> anyhow::Result<Published> {
    let started = Instant::now();
    // A JoinSet aborts its tasks when dropped: aborting this future (the
    // `footprint` trickle) stops every publisher, not just the waiting.
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let tag = format!("bench-pub-{tag}-{c}-{}", std::process::id());
        let per_client = rate.map(|r| r / clients as f64);
        let mine: Vec<u32> = (0..devices)
            .filter(|d| *d as usize % clients == c)
            .collect();
        let mine = if mine.is_empty() {
            vec![c as u32]
        } else {
            mine
        };
        let topics = mine
            .iter()
            .map(|d| (*d, format!("{root}/dev-{d:05}/telemetry")))
            .collect();
        tasks.spawn(publish_one(port, tag, topics, duration, per_client));
    }
    let mut total = Published::default();
    while let Some(joined) = tasks.join_next().await {
        let p = joined??;
        total.messages += p.messages;
        total.payload_bytes += p.payload_bytes;
    }
    total.seconds = started.elapsed().as_secs_f64();
    Ok(total)
}

/// One publisher connection over its `(device, topic)`s.
async fn publish_one(
    port: u16,
    client_id: String,
    topics: Vec<(u32, String)>,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<Published> {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(500)
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 2000);
    eventloop.set_network_options(no_delay());
    let acked = Arc::new(AtomicU64::new(0));
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    // In a JoinSet of its own, so that it stops with this task if aborted.
    let mut driver = tokio::task::JoinSet::new();
    {
        let acked = acked.clone();
        let mut connected = Some(connected_tx);
        driver.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = connected.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(anyhow::anyhow!("publisher connection: {e}")),
                }
            }
        });
    }
    // Connected before the first message is stamped: a broker slow to
    // accept a connection must not show up as the agent's latency.
    tokio::time::timeout(Duration::from_secs(10), connected_rx)
        .await
        .map_err(|_| anyhow::anyhow!("publisher: no ConnAck from the broker within 10 s"))?
        .map_err(|_| anyhow::anyhow!("publisher connection closed before its ConnAck"))?;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut bytes = 0u64;
    let mut n = 0u64;
    'outer: while start.elapsed() < duration {
        for (device, topic) in &topics {
            let body = payload(n, *device, now_ns());
            bytes += body.len() as u64;
            client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, body)
                .await?;
            sent += 1;
            if let Some(rate) = rate {
                if sent.is_multiple_of(16) {
                    let due = start + Duration::from_secs_f64(sent as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            if sent.is_multiple_of(256) && start.elapsed() >= duration {
                break 'outer;
            }
        }
        n += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.disconnect().await.ok();
    let _ = tokio::time::timeout(Duration::from_secs(2), driver.join_next()).await;
    Ok(Published {
        messages: sent,
        payload_bytes: bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The `timestamp_ns` a payload of [`payload`] carries.
fn payload_timestamp(body: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"timestamp_ns\":";
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&body[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// A QoS 1 subscriber to every device topic under a root (see
/// [`publish`]) that only counts, and records publish → delivered
/// latency (microseconds) from the payloads' timestamps.
pub struct Counter {
    pub count: Arc<AtomicU64>,
    latency: Arc<Mutex<hdrhistogram::Histogram<u64>>>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Counter {
    pub async fn start(port: u16, root: &str) -> anyhow::Result<Counter> {
        let mut options = MqttOptions::new(
            format!("bench-counter-{}", std::process::id()),
            "127.0.0.1",
            port,
        );
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        eventloop.set_network_options(no_delay());
        client
            .subscribe(format!("{root}/+/telemetry"), QoS::AtLeastOnce)
            .await?;
        let count = Arc::new(AtomicU64::new(0));
        let latency = Arc::new(Mutex::new(crate::scenarios::histogram()));
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let task = {
            let count = count.clone();
            let latency = latency.clone();
            tokio::spawn(async move {
                let mut subscribed = Some(subscribed_tx);
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::Publish(publish))) => {
                            count.fetch_add(1, Ordering::Relaxed);
                            if let Some(ts) = payload_timestamp(&publish.payload) {
                                let micros = ((now_ns() - ts) / 1000).max(1) as u64;
                                if let Ok(mut h) = latency.lock() {
                                    let _ = h.record(micros);
                                }
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = subscribed.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .map_err(|_| anyhow::anyhow!("no SubAck from the broker"))??;
        Ok(Counter {
            count,
            latency,
            client,
            task,
        })
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The latencies recorded since the last call, and a fresh start.
    pub fn take_latency(&self) -> hdrhistogram::Histogram<u64> {
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *h, crate::scenarios::histogram())
    }

    pub async fn stop(self) {
        self.client.disconnect().await.ok();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subscriber_reads_back_the_publish_time() {
        let body = payload(7, 3, 1_700_000_000_123_456_789);
        assert_eq!(
            payload_timestamp(body.as_bytes()),
            Some(1_700_000_000_123_456_789)
        );
        assert_eq!(payload_timestamp(b"{\"n\":1}"), None);
    }
}
