//! End-to-end tests: an in-process server on 127.0.0.1:0 with a dev PKI,
//! talked to by the generated tonic client over real mutual TLS.

mod support;

use std::time::Duration;

use edgefleet_pki::dev::{issue_agent, issue_site, Validity};
use edgefleet_proto::agent_message::Kind as In;
use edgefleet_proto::ingest_message::Kind as Out;
use edgefleet_proto::{record, Goodbye, Heartbeat, RawPayload, Record, RecordBatch};
use support::*;
use tonic::codec::CompressionEncoding;
use tonic::transport::Identity;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test]
async fn hello_ack_then_pipelined_batches_are_acked_in_order_and_queryable() {
    let fx = Fixture::new();
    let server = fx.start().await;
    let mut client = fx
        .client(&server.addrs, "gw-1")
        .await
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd);
    let (mut stream, ack) = AgentStream::hello(&mut client, "gw-1").await;
    assert_eq!(ack.stored_through, 0);
    assert_eq!(ack.agent_id, "gw-1");
    assert_eq!(ack.credit, cloud_ingest::config::DEFAULT_CREDIT);
    assert_eq!(ack.max_message_bytes, 4 * 1024 * 1024);
    assert_eq!(ack.heartbeat_interval_ms, 10_000);
    assert!(!ack.ingest_version.is_empty());

    // Three batches in flight before reading any ack.
    stream.send(batch(1..=3)).await;
    stream.send(In::Heartbeat(Heartbeat::default())).await;
    stream.send(batch(4..=6)).await;
    stream.send(batch(7..=10)).await;
    let acks: Vec<_> = [
        stream.expect_ack().await,
        stream.expect_ack().await,
        stream.expect_ack().await,
    ]
    .into_iter()
    .map(|a| (a.acked_through, a.stored, a.duplicates, a.credit))
    .collect();
    assert_eq!(acks, vec![(3, 3, 0, 1), (6, 3, 0, 1), (10, 4, 0, 1)]);

    stream
        .send(In::Goodbye(Goodbye {
            reason: "done".into(),
        }))
        .await;
    assert!(
        matches!(stream.next().await, Ok(None)),
        "Goodbye ends the stream cleanly"
    );

    let stats = server.stats().await;
    assert_eq!(stats.agents["gw-1"].records, 10);
    assert_eq!(stats.agents["gw-1"].stored_through, 10);

    let body = cloud_ingest::query::http_get(&server.admin_url(), "/query?agent=gw-1&limit=3")
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["agent"], "gw-1");
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[2]["seq"], 3);
    assert_eq!(lines[0]["device"], "dev-1");
    assert_eq!(lines[0]["signals"]["temp"], 0.5);
    assert_eq!(lines[0]["signals"]["n"], 1);
    let by_device = cloud_ingest::query::http_get(&server.admin_url(), "/query?device=dev-0")
        .await
        .unwrap();
    let seqs: Vec<u64> = by_device
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![3, 6, 9]);

    let metrics = server.metrics_text().await;
    assert_eq!(
        metric_value(&metrics, "ingest_records_stored_total"),
        Some(10)
    );
    assert_eq!(metric_value(&metrics, "ingest_batches_total"), Some(3));
    assert!(metric_value(&metrics, "ingest_bytes_received_total").unwrap() > 0);
    assert!(metrics.contains("ingest_commit_seconds_count"));
    server.stop().await;
}

/// Records compressed by the agent inside the batch (`records_zstd`), with
/// the agent's own compressor: stored as if sent plain; a batch that
/// decompresses past the message limit or is damaged ends its stream.
#[tokio::test]
async fn batches_compressed_inside_the_message_are_stored_and_bad_ones_refused() {
    use edgefleet_proto::batch_zstd::BatchCompressor;
    use edgefleet_proto::encoded::EncodedBatch;
    use prost::Message;

    let fx = Fixture::new();
    let mut config = fx.config();
    config.max_message_bytes = 64 * 1024;
    let server = Server::start(config).await;
    let mut client = fx.client(&server.addrs, "gw-1").await;
    let (mut stream, ack) = AgentStream::hello(&mut client, "gw-1").await;
    assert_eq!(ack.batch_encodings, ["zstd"]);
    let compressed = |seqs: std::ops::RangeInclusive<u64>| -> (RecordBatch, usize) {
        let plain = EncodedBatch {
            records: seqs.map(|s| record(s).encode_to_vec().into()).collect(),
            ..Default::default()
        };
        let plain_len = plain.encoded_len();
        let sent = BatchCompressor::default().compress(plain).unwrap();
        assert!(!sent.records_zstd.is_empty(), "too small to be compressed");
        let batch = RecordBatch::decode(sent.encode_to_vec().as_slice()).unwrap();
        (batch, plain_len)
    };

    let (batch, _) = compressed(1..=600);
    assert!(batch.records.is_empty());
    stream.send(In::Batch(batch)).await;
    let ack = stream.expect_ack().await;
    assert_eq!((ack.acked_through, ack.stored), (600, 600));

    let (big, plain_len) = compressed(601..=2000);
    assert!(
        big.encoded_len() < 64 * 1024 && plain_len > 64 * 1024,
        "{} {plain_len}",
        big.encoded_len()
    );
    stream.send(In::Batch(big)).await;
    let status = stream.expect_status().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("over the limit"), "{status:?}");

    let (mut stream, ack) = AgentStream::hello(&mut client, "gw-1").await;
    assert_eq!(ack.stored_through, 600);
    let (mut damaged, _) = compressed(601..=1000);
    damaged
        .records_zstd
        .truncate(damaged.records_zstd.len() / 2);
    stream.send(In::Batch(damaged)).await;
    let status = stream.expect_status().await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("records_zstd"), "{status:?}");

    let (mut stream, _) = AgentStream::hello(&mut client, "gw-1").await;
    stream.send(In::Batch(compressed(601..=1000).0)).await;
    assert_eq!(stream.expect_ack().await.acked_through, 1000);
    let metrics = server.metrics_text().await;
    assert_eq!(
        metric_value(&metrics, "ingest_batches_compressed_total"),
        Some(4)
    );
    let stats = server.stats().await;
    assert_eq!(stats.agents["gw-1"].records, 1000);
    server.stop().await;
}

#[tokio::test]
async fn a_batch_resent_after_reconnect_is_stored_once() {
    let fx = Fixture::new();
    let server = fx.start().await;
    let mut client = fx.client(&server.addrs, "gw-1").await;
    let (mut stream, _) = AgentStream::hello(&mut client, "gw-1").await;
    stream.send(batch(1..=5)).await;
    assert_eq!(stream.expect_ack().await.acked_through, 5);
    drop(stream);

    // The agent did not see the ack (say) and resends 3..=5 along with new records.
    let mut client = fx.client(&server.addrs, "gw-1").await;
    let (mut stream, ack) = AgentStream::hello(&mut client, "gw-1").await;
    assert_eq!(ack.stored_through, 5);
    stream.send(batch(3..=8)).await;
    let ack = stream.expect_ack().await;
    assert_eq!((ack.acked_through, ack.stored, ack.duplicates), (8, 3, 3));
    // Entirely old records: all duplicates.
    stream.send(batch([9])).await;
    stream.expect_ack().await;
    drop(stream);

    let mut client = fx.client(&server.addrs, "gw-1").await;
    let (mut stream, _) = AgentStream::hello(&mut client, "gw-1").await;
    stream.send(batch(1..=9)).await;
    let ack = stream.expect_ack().await;
    assert_eq!((ack.acked_through, ack.stored, ack.duplicates), (9, 0, 9));

    let stats = server.stats().await;
    assert_eq!(stats.agents["gw-1"].records, 9);
    assert_eq!(stats.total_records, 9);
    server.wait_metric("ingest_duplicates_total", 12).await;
    server.stop().await;
}

#[tokio::test]
async fn hello_claiming_another_identity_is_permission_denied() {
    let fx = Fixture::new();
    let server = fx.start().await;
    let mut client = fx.client(&server.addrs, "gw-1").await;
    let mut stream = AgentStream::open(&mut client).await.unwrap();
    stream.send(hello("gw-2")).await;
    let status = stream.expect_status().await;
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        status.message(),
        "not authorised: hello claims agent `gw-2` but the certificate identifies agent `gw-1`"
    );
    server
        .wait_metric("ingest_rejects_total{reason=\"identity_mismatch\"}", 1)
        .await;

    // An empty claim is fine: the certificate decides.
    let (_stream, ack) = AgentStream::hello(&mut client, "").await;
    assert_eq!(ack.agent_id, "gw-1");
    server.stop().await;
}

#[tokio::test]
async fn gateways_sharing_a_site_certificate_keep_their_own_sessions_and_sequences() {
    let fx = Fixture::new();
    issue_site(&fx.pki, "plant-7", Validity::days(1)).unwrap();
    let server = fx.start().await;
    let (cert, key) = (fx.pki.site_cert("plant-7"), fx.pki.site_key("plant-7"));
    let mut client_a = fx.client_with(&server.addrs, &cert, &key).await;
    let mut client_b = fx.client_with(&server.addrs, &cert, &key).await;

    let (mut a, ack) = AgentStream::hello(&mut client_a, "gw-a@plant-7").await;
    assert_eq!(ack.agent_id, "gw-a@plant-7");
    a.send(batch(1..=5)).await;
    assert_eq!(a.expect_ack().await.acked_through, 5);
    // Same certificate, other node: its own sequence, and no supersede.
    let (mut b, ack) = AgentStream::hello(&mut client_b, "gw-b@plant-7").await;
    assert_eq!(
        (ack.agent_id.as_str(), ack.stored_through),
        ("gw-b@plant-7", 0)
    );
    b.send(batch(1..=3)).await;
    assert_eq!(b.expect_ack().await.acked_through, 3);
    a.send(batch(6..=7)).await;
    assert_eq!(a.expect_ack().await.acked_through, 7);
    server.wait_metric("ingest_connected_agents", 2).await;
    let stats = server.stats().await;
    assert_eq!(stats.agents["gw-a@plant-7"].records, 7);
    assert_eq!(stats.agents["gw-b@plant-7"].records, 3);

    // A site certificate speaks only for nodes of its own site.
    for claim in ["", "plant-7", "gw-a@plant-8", "gw-1", "a b@plant-7"] {
        let mut stream = AgentStream::open(&mut client_a).await.unwrap();
        stream.send(hello(claim)).await;
        let status = stream.expect_status().await;
        assert_eq!(status.code(), Code::PermissionDenied, "{claim:?}");
        assert!(
            status.message().contains("plant-7"),
            "{claim:?}: {status:?}"
        );
    }
    server
        .wait_metric("ingest_rejects_total{reason=\"identity_mismatch\"}", 5)
        .await;
    server.stop().await;
}

#[tokio::test]
async fn bad_certificates_fail_the_handshake_and_are_counted_by_reason() {
    let fx = Fixture::new();
    let server = fx.start().await;

    // A certificate from another CA.
    let other = Fixture::new();
    let foreign = Identity::from_pem(
        std::fs::read(other.pki.agent_cert("gw-1")).unwrap(),
        std::fs::read(other.pki.agent_key("gw-1")).unwrap(),
    );
    assert_handshake_fails(&fx, &server, Some(foreign)).await;
    server
        .wait_metric("ingest_rejects_total{reason=\"unknown_ca\"}", 1)
        .await;

    // An expired certificate from the right CA.
    issue_agent(&fx.pki, "gw-old", Validity::expired()).unwrap();
    let expired = Identity::from_pem(
        std::fs::read(fx.pki.agent_cert("gw-old")).unwrap(),
        std::fs::read(fx.pki.agent_key("gw-old")).unwrap(),
    );
    assert_handshake_fails(&fx, &server, Some(expired)).await;
    server
        .wait_metric("ingest_rejects_total{reason=\"expired_certificate\"}", 1)
        .await;

    // No client certificate at all.
    assert_handshake_fails(&fx, &server, None).await;
    server
        .wait_metric("ingest_rejects_total{reason=\"no_certificate\"}", 1)
        .await;

    // A silent client is cut off by the handshake timeout, not kept forever.
    let fx2 = Fixture::new();
    let mut config = fx2.config();
    config.handshake_timeout = Duration::from_millis(200);
    let slow = Server::start(config).await;
    let _tcp = tokio::net::TcpStream::connect(slow.addrs.grpc)
        .await
        .unwrap();
    slow.wait_metric("ingest_rejects_total{reason=\"handshake_timeout\"}", 1)
        .await;

    // None of this disturbed a good agent.
    let mut client = fx.client(&server.addrs, "gw-1").await;
    let (mut stream, _) = AgentStream::hello(&mut client, "gw-1").await;
    stream.send(batch([1])).await;
    assert_eq!(stream.expect_ack().await.acked_through, 1);
    slow.stop().await;
    server.stop().await;
}

/// With TLS 1.3 the client may finish its side of the handshake before the
/// server has judged its certificate, so the failure can surface at connect
/// or at the first call: either way, no HelloAck.
async fn assert_handshake_fails(fx: &Fixture, server: &Server, identity: Option<Identity>) {
    let Ok(mut client) = connect(&server.addrs, &fx.pki.ca_cert(), identity).await else {
        return;
    };
    let Ok(mut stream) = AgentStream::open(&mut client).await else {
        return;
    };
    let _ = stream
        .tx
        .send(edgefleet_proto::AgentMessage {
            kind: Some(hello("gw-1")),
        })
        .await;
    match stream.next().await {
        Err(_) => {}
        other => panic!("the handshake should have failed, got {other:?}"),
    }
}

#[tokio::test]
async fn an_oversized_message_fails_only_its_own_stream() {
    let fx = Fixture::new();
    let mut config = fx.config();
    config.max_message_bytes = 64 * 1024;
    let server = Server::start(config).await;
    let mut c1 = fx.client(&server.addrs, "gw-1").await;
    let mut c2 = fx.client(&server.addrs, "gw-2").await;
    let (mut s1, ack) = AgentStream::hello(&mut c1, "gw-1").await;
    assert_eq!(ack.max_message_bytes, 64 * 1024);
    let (mut s2, _) = AgentStream::hello(&mut c2, "gw-2").await;
    s2.send(batch([1])).await;
    s2.expect_ack().await;

    let big = Record {
        seq: 1,
        value: Some(record::Value::Raw(RawPayload {
            data: vec![7u8; 100 * 1024],
            content_type: "application/octet-stream".into(),
        })),
        ..Record::default()
    };
    s1.send(In::Batch(RecordBatch {
        records: vec![big],
        ..Default::default()
    }))
    .await;
    let status = s1.expect_status().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    s2.send(batch([2, 3])).await;
    assert_eq!(s2.expect_ack().await.acked_through, 3);
    server
        .wait_metric("ingest_rejects_total{reason=\"message_too_large\"}", 1)
        .await;
    // The same connection can open a fresh stream.
    let (mut s1, _) = AgentStream::hello(&mut c1, "gw-1").await;
    s1.send(batch([1])).await;
    assert_eq!(s1.expect_ack().await.stored, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_new_stream_from_the_same_agent_supersedes_the_old() {
    let fx = Fixture::new();
    let server = fx.start().await;
    let mut c1 = fx.client(&server.addrs, "gw-1").await;
    let (mut old, _) = AgentStream::hello(&mut c1, "gw-1").await;
    old.send(batch(1..=4)).await;
    assert_eq!(old.expect_ack().await.acked_through, 4);

    // More batches the old stream may or may not have received when the new
    // stream says Hello: whatever it received is committed before HelloAck.
    old.send(batch(5..=8)).await;
    old.send(batch(9..=12)).await;
    let mut c2 = fx.client(&server.addrs, "gw-1").await;
    let (mut new, ack) = AgentStream::hello(&mut c2, "gw-1").await;
    assert!([4, 8, 12].contains(&ack.stored_through), "{ack:?}");
    let status = old.expect_status().await;
    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains("superseded"), "{status:?}");

    let stats = server.stats().await;
    assert_eq!(
        stats.agents["gw-1"].stored_through, ack.stored_through,
        "nothing from the old stream is committed after the new HelloAck"
    );
    let next = ack.stored_through + 1;
    new.send(batch(next..=next + 1)).await;
    assert_eq!(new.expect_ack().await.acked_through, next + 1);
    server.wait_metric("ingest_connected_agents", 1).await;
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_acks_everything_received_then_goes_away() {
    let fx = Fixture::new();
    let mut config = fx.config();
    config.credit = 64;
    let server = Server::start(config).await;
    let health_addr = server.addrs.health.unwrap();
    let mut health = HealthClient::new(plain_channel(health_addr).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let mut client = fx.client(&server.addrs, "gw-1").await;
    let (mut stream, _) = AgentStream::hello(&mut client, "gw-1").await;
    // Plenty of batches in flight, then shut down without waiting for acks.
    for b in 0..60u64 {
        stream.send(batch(b * 50 + 1..=b * 50 + 50)).await;
    }
    // Shut down as soon as the server is busy with them.
    let first = stream.expect_ack().await;
    assert_eq!(first.acked_through, 50);
    server.shutdown.cancel();

    let mut last_acked = first.acked_through;
    let mut go_away = None;
    loop {
        match stream.next().await {
            Ok(Some(Out::Ack(ack))) => {
                assert!(go_away.is_none(), "an ack after GoAway");
                assert_eq!(
                    ack.acked_through,
                    last_acked + 50,
                    "acks are in order, one per batch"
                );
                last_acked = ack.acked_through;
            }
            Ok(Some(Out::GoAway(g))) => go_away = Some(g),
            Ok(None) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let go_away = go_away.expect("GoAway before the end of the stream");
    assert_eq!(go_away.retry_after_ms, 1000);
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing,
        "health turns NOT_SERVING while draining"
    );
    drop(watch);
    drop(health);
    tokio::time::timeout(Duration::from_secs(20), server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // Everything stored was acknowledged and everything acknowledged stored.
    let stats = store_stats(&fx.store());
    assert_eq!(stats.agents["gw-1"].stored_through, last_acked);
    assert_eq!(stats.agents["gw-1"].records, last_acked);
}

#[tokio::test]
async fn reopening_the_store_keeps_stored_through() {
    let fx = Fixture::new();
    let server = fx.start().await;
    let mut client = fx.client(&server.addrs, "gw-2").await;
    let (mut stream, _) = AgentStream::hello(&mut client, "gw-2").await;
    stream.send(batch([2, 5, 11])).await;
    assert_eq!(stream.expect_ack().await.acked_through, 11);
    drop(stream);
    server.stop().await;

    assert_eq!(store_stats(&fx.store()).agents["gw-2"].stored_through, 11);

    let server = fx.start().await;
    let mut client = fx.client(&server.addrs, "gw-2").await;
    let (mut stream, ack) = AgentStream::hello(&mut client, "gw-2").await;
    assert_eq!(ack.stored_through, 11);
    stream.send(batch([11, 12])).await;
    let ack = stream.expect_ack().await;
    assert_eq!((ack.stored, ack.duplicates), (1, 1));
    server.stop().await;
}

#[tokio::test]
async fn retention_deletes_the_oldest_records_and_keeps_stored_through() {
    let fx = Fixture::new();
    let mut config = fx.config();
    let cloud_ingest::SinkConfig::Embedded(store) = &mut config.sink else {
        unreachable!("the harness configures the embedded store")
    };
    store.retention.max_bytes = Some(1_000);
    store.retention.interval = Duration::from_millis(50);
    let server = Server::start(config).await;
    let mut client = fx.client(&server.addrs, "gw-1").await;
    let (mut stream, _) = AgentStream::hello(&mut client, "gw-1").await;
    for seq in 1..=40u64 {
        stream.send(batch([seq])).await;
        stream.expect_ack().await;
    }
    let mut stats = server.stats().await;
    for _ in 0..100 {
        if stats.stored_bytes <= 1_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        stats = server.stats().await;
    }
    assert!(stats.stored_bytes <= 1_000, "{stats:?}");
    let kept = stats.agents["gw-1"].records;
    assert!(kept > 0 && kept < 40, "{stats:?}");
    assert_eq!(stats.agents["gw-1"].stored_through, 40);
    let body = cloud_ingest::query::http_get(&server.admin_url(), "/query?agent=gw-1")
        .await
        .unwrap();
    let seqs: Vec<u64> = body
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let newest: Vec<u64> = (40 - kept + 1..=40).collect();
    assert_eq!(seqs, newest, "the oldest records went first");
    server.stop().await;
}

#[tokio::test]
async fn streams_must_start_with_hello_in_time_and_keep_seqs_increasing() {
    let fx = Fixture::new();
    let mut config = fx.config();
    config.hello_timeout = Duration::from_millis(500);
    let server = Server::start(config).await;
    let mut client = fx.client(&server.addrs, "gw-1").await;

    let mut stream = AgentStream::open(&mut client).await.unwrap();
    stream.send(batch([1])).await;
    let status = stream.expect_status().await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("must be Hello"), "{status:?}");

    let mut silent = AgentStream::open(&mut client).await.unwrap();
    assert_eq!(silent.expect_status().await.code(), Code::DeadlineExceeded);

    let (mut stream, _) = AgentStream::hello(&mut client, "gw-1").await;
    stream.send(batch([5, 6])).await;
    stream.send(batch([6, 7])).await;
    stream.expect_ack().await;
    let status = stream.expect_status().await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("record seq 6 is not above 6"),
        "{status:?}"
    );

    server
        .wait_metric("ingest_rejects_total{reason=\"no_hello\"}", 1)
        .await;
    server
        .wait_metric("ingest_rejects_total{reason=\"hello_timeout\"}", 1)
        .await;
    server
        .wait_metric("ingest_rejects_total{reason=\"bad_sequence\"}", 1)
        .await;
    server.stop().await;
}

/// Records are stored as they arrive, still encoded, so the ingest checks
/// each one: a record that would not decode fails its stream, naming the
/// record and the field, and nothing of its batch is stored.
#[tokio::test]
async fn a_malformed_record_fails_its_stream_naming_the_field() {
    use edgefleet_proto::encoded::telemetry_client::TelemetryClient as EncodedClient;
    use edgefleet_proto::encoded::{AgentFrame, AgentFrameKind, EncodedBatch};
    use prost::Message;

    let fx = Fixture::new();
    let server = Server::start(fx.config()).await;
    let identity = tonic::transport::Identity::from_pem(
        std::fs::read(fx.pki.agent_cert("gw-1")).unwrap(),
        std::fs::read(fx.pki.agent_key("gw-1")).unwrap(),
    );
    let channel = support::channel(&server.addrs, &fx.pki.ca_cert(), Some(identity))
        .await
        .unwrap();
    let mut client = EncodedClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let In::Hello(hello) = support::hello("gw-1") else {
        unreachable!()
    };
    tx.send(AgentFrame::new(AgentFrameKind::Hello(hello)))
        .await
        .unwrap();
    let mut inbound = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(inbound.message().await.unwrap().is_some(), "HelloAck");

    let good = support::record(1).encode_to_vec();
    let mut bad = support::record(2).encode_to_vec();
    // The device id ("dev-2", field 3) made invalid UTF-8.
    let at = bad.windows(5).position(|w| w == b"dev-2").unwrap();
    bad[at] = 0xFF;
    tx.send(AgentFrame::new(AgentFrameKind::Batch(EncodedBatch {
        records: vec![good.into(), bad.into()],
        ..Default::default()
    })))
    .await
    .unwrap();
    let status = loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended cleanly"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains(
            "record 1 of the batch (after seq 1) is malformed: Record.device_id: not valid UTF-8"
        ),
        "{status:?}"
    );
    server
        .wait_metric("ingest_rejects_total{reason=\"malformed_record\"}", 1)
        .await;
    assert_eq!(server.stats().await.total_records, 0);
    server.stop().await;
}

#[tokio::test]
async fn a_silent_stream_is_closed_after_three_heartbeat_intervals() {
    let fx = Fixture::new();
    let mut config = fx.config();
    config.heartbeat_interval = Duration::from_millis(200);
    let server = Server::start(config).await;
    let mut client = fx.client(&server.addrs, "gw-1").await;
    let (mut stream, ack) = AgentStream::hello(&mut client, "gw-1").await;
    assert_eq!(ack.heartbeat_interval_ms, 200);
    // Heartbeats keep it open well past the idle deadline (600 ms)...
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream.send(In::Heartbeat(Heartbeat::default())).await;
    }
    stream.send(batch([1])).await;
    assert_eq!(stream.expect_ack().await.acked_through, 1);
    // ...silence closes it.
    let status = stream.expect_status().await;
    assert_eq!(status.code(), Code::DeadlineExceeded);
    server
        .wait_metric("ingest_rejects_total{reason=\"idle_timeout\"}", 1)
        .await;
    server.stop().await;
}

#[tokio::test]
async fn health_is_served_on_the_mtls_and_the_plaintext_ports() {
    let fx = Fixture::new();
    let server = fx.start().await;
    let health_addr = server.addrs.health.unwrap();
    let mut plain = HealthClient::new(plain_channel(health_addr).await);
    let service = "edgefleet.telemetry.v1.Telemetry".to_string();
    let status = plain
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    let identity = Identity::from_pem(
        std::fs::read(fx.pki.agent_cert("gw-1")).unwrap(),
        std::fs::read(fx.pki.agent_key("gw-1")).unwrap(),
    );
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(fx.pki.ca_cert()).unwrap(),
        ))
        .identity(identity)
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", server.addrs.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest { service })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    let ready = cloud_ingest::query::http_get(&server.admin_url(), "/readyz")
        .await
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    server.stop().await;
}

#[tokio::test]
async fn plaintext_dev_mode_takes_the_identity_from_hello() {
    let fx = Fixture::new();
    let mut config = fx.config();
    config.tls = cloud_ingest::TlsMode::InsecurePlaintextDevOnly;
    let server = Server::start(config).await;
    let mut client = edgefleet_proto::telemetry_client::TelemetryClient::connect(format!(
        "http://{}",
        server.addrs.grpc
    ))
    .await
    .unwrap();
    let (mut stream, ack) = AgentStream::hello(&mut client, "laptop-1").await;
    assert_eq!(ack.agent_id, "laptop-1");
    stream.send(batch([1])).await;
    stream.expect_ack().await;
    assert_eq!(server.stats().await.agents["laptop-1"].records, 1);

    let mut stream = AgentStream::open(&mut client).await.unwrap();
    stream.send(hello("not an id")).await;
    assert_eq!(stream.expect_status().await.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn the_cli_reads_the_store_and_points_at_the_server_while_it_runs() {
    let fx = Fixture::new();
    let server = fx.start().await;
    let mut client = fx.client(&server.addrs, "gw-1").await;
    let (mut stream, _) = AgentStream::hello(&mut client, "gw-1").await;
    stream.send(batch(1..=4)).await;
    stream.expect_ack().await;

    let store = fx.store();
    let store_arg = store.to_str().unwrap().to_string();
    let url = server.admin_url();
    let locked = cli(&["query", "--store", &store_arg]).await;
    assert!(!locked.status.success());
    let stderr = String::from_utf8_lossy(&locked.stderr);
    assert!(
        stderr.contains("in use by a running cloud-ingest") && stderr.contains(&url),
        "{stderr}"
    );

    let via_url = cli(&["query", "--url", &url, "--agent", "gw-1", "--since", "1h"]).await;
    assert!(via_url.status.success(), "{via_url:?}");
    // Test records carry 2023 timestamps: nothing in the last hour.
    assert_eq!(String::from_utf8_lossy(&via_url.stdout), "");
    let via_url = cli(&["query", "--url", &url, "--agent", "gw-1"]).await;
    assert_eq!(String::from_utf8_lossy(&via_url.stdout).lines().count(), 4);
    drop(stream);
    server.stop().await;

    let stats = cli(&["stats", "--store", &store_arg]).await;
    assert!(stats.status.success(), "{stats:?}");
    let json: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(json["agents"]["gw-1"]["records"], 4);
    assert_eq!(json["agents"]["gw-1"]["stored_through"], 4);

    let query = cli(&[
        "query",
        "--store",
        &store_arg,
        "--device",
        "dev-1",
        "--since",
        "2023-11-14T00:00:00Z",
    ])
    .await;
    assert!(query.status.success(), "{query:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&query.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[1]["seq"], 4);

    let nowhere = fx.dir.path().join("nowhere");
    let missing = cli(&["stats", "--store", nowhere.to_str().unwrap()]).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no store at"));
}

/// Runs the `cloud-ingest` binary off the async runtime (the server under
/// test shares this runtime and must keep answering).
async fn cli(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cloud-ingest"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

async fn plain_channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_binary_serves_agents_and_exits_zero_on_sigterm() {
    use std::io::BufRead;
    let fx = Fixture::new();
    let pki = &fx.pki;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-ingest"))
        .arg("serve")
        .arg("--cert")
        .arg(pki.server_cert())
        .arg("--key")
        .arg(pki.server_key())
        .arg("--client-ca")
        .arg(pki.ca_cert())
        .arg("--store")
        .arg(fx.store())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--log-format", "json"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Learn the bound addresses from the JSON log.
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let listening = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.recv())
            .await
            .unwrap_or_else(|_| panic!("no `listening` log line; saw {seen:?}"))
            .unwrap_or_else(|| panic!("the server exited; it logged {seen:?}"));
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        if json["fields"]["message"] == "cloud-ingest listening" {
            break json;
        }
        seen.push(line);
    };
    let addrs = cloud_ingest::BoundAddrs {
        grpc: listening["fields"]["grpc"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
        metrics: Some(
            listening["fields"]["metrics"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
        ),
        health: None,
    };
    let mut client = fx.client(&addrs, "gw-2").await;
    let (mut stream, _) = AgentStream::hello(&mut client, "gw-2").await;
    stream.send(batch(1..=3)).await;
    assert_eq!(stream.expect_ack().await.acked_through, 3);

    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(matches!(stream.next().await, Ok(Some(Out::GoAway(_)))));
    assert!(matches!(stream.next().await, Ok(None)));
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(store_stats(&fx.store()).agents["gw-2"].records, 3);
}

#[tokio::test]
async fn an_exhausted_byte_budget_slows_streams_down_without_losing_or_reordering() {
    let fx = Fixture::new();
    let mut config = fx.config();
    // One byte: every batch needs the whole budget, so at most one batch in
    // the whole server waits for its commit at any time.
    config.byte_budget = 1;
    let server = Server::start(config).await;
    let mut c1 = fx.client(&server.addrs, "gw-1").await;
    let mut c2 = fx.client(&server.addrs, "gw-2").await;
    let (mut s1, _) = AgentStream::hello(&mut c1, "gw-1").await;
    let (mut s2, _) = AgentStream::hello(&mut c2, "gw-2").await;
    for b in 0..8u64 {
        s1.send(batch(b * 10 + 1..=b * 10 + 10)).await;
        s2.send(batch(b * 5 + 1..=b * 5 + 5)).await;
    }
    for b in 1..=8u64 {
        assert_eq!(s1.expect_ack().await.acked_through, b * 10);
        assert_eq!(s2.expect_ack().await.acked_through, b * 5);
    }
    let stats = server.stats().await;
    assert_eq!(stats.agents["gw-1"].records, 80);
    assert_eq!(stats.agents["gw-2"].records, 40);
    server.stop().await;
}
