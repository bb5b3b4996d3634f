//! Simulated MQTT devices: each publishes JSON telemetry with a per-device
//! counter `n` (0, 1, 2, ...), so a consumer can prove that every message
//! arrived exactly once and in order.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

#[derive(Parser, Debug)]
#[command(about = "Publish simulated device telemetry to an MQTT broker")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    #[arg(long, default_value_t = 5)]
    devices: u32,
    /// Messages per device.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Messages per second over all devices; 0 = as fast as the broker takes them.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Every Nth message (per device) is malformed JSON; 0 = never.
    #[arg(long, default_value_t = 0)]
    bad_every: u64,
    #[arg(long, default_value = "devsim")]
    client_id: String,
    /// Adds a `noise` field of this many random characters to each message:
    /// payloads that compression cannot shrink, for tests of byte caps.
    #[arg(long, default_value_t = 0)]
    noise_bytes: usize,
    /// Topic is `<prefix>/<device>/telemetry`.
    #[arg(long, default_value = "devices")]
    prefix: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut options = MqttOptions::new(&args.client_id, &args.host, args.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(200)
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let total = args.messages * u64::from(args.devices);

    let publisher = {
        let client = client.clone();
        let args_prefix = args.prefix.clone();
        let (devices, messages, rate, bad_every, noise_bytes) = (
            args.devices,
            args.messages,
            args.rate,
            args.bad_every,
            args.noise_bytes,
        );
        let mut noise_state = 0x9e37_79b9_7f4a_7c15u64;
        tokio::spawn(async move {
            let started = Instant::now();
            let mut sent = 0u64;
            for n in 0..messages {
                for d in 0..devices {
                    let device = format!("dev-{d:03}");
                    let topic = format!("{args_prefix}/{device}/telemetry");
                    let payload = if bad_every > 0 && n % bad_every == bad_every - 1 {
                        format!("{{\"n\": {n}, \"temp\": }}")
                    } else {
                        let t = n as f64 / 10.0;
                        let noise = random_text(&mut noise_state, noise_bytes);
                        format!(
                            "{{\"n\":{n},\"temp\":{:.3},\"rpm\":{},\"ok\":{},\"motor\":{{\"current\":{:.2}}},\"mode\":\"{}\"{}}}",
                            21.0 + 4.0 * (t + f64::from(d)).sin(),
                            1200 + (n % 400),
                            n % 7 != 0,
                            3.0 + (t * 0.5).cos(),
                            if n % 100 < 50 { "eco" } else { "boost" },
                            if noise.is_empty() { String::new() } else { format!(",\"noise\":\"{noise}\"") }
                        )
                    };
                    if client.publish(topic, qos, false, payload).await.is_err() {
                        return sent;
                    }
                    sent += 1;
                    if rate > 0 {
                        let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
            }
            sent
        })
    };

    // Drive the connection until every message is acknowledged by the broker.
    let mut acked = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while acked < total || (qos == QoS::AtMostOnce && !publisher.is_finished()) {
        if Instant::now() > deadline {
            bail!("gave up after 600 s with {acked} of {total} acknowledged");
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => acked += 1,
            Ok(_) => {}
            Err(e) => {
                eprintln!("devsim: connection error: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let sent = publisher.await.context("publisher task")?;
    client.disconnect().await.ok();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    println!(
        "{}",
        serde_json::json!({ "published": sent, "acknowledged": acked })
    );
    Ok(())
}

/// `len` characters from a 64-letter alphabet, drawn with xorshift64.
fn random_text(state: &mut u64, len: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..len)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            char::from(ALPHABET[(*state >> 58) as usize])
        })
        .collect()
}
