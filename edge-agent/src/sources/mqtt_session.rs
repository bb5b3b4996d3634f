//! One MQTT 3.1.1 connection to the broker, on rumqttc's packet codec.
//!
//! rumqttc's event loop writes and flushes each request on its own, so with
//! manual acknowledgements every message cost a PUBACK syscall of its own
//! (14 % of the agent's CPU at 100k messages/s, and as many small segments
//! for the broker to read). Here the source owns the socket: the PUBACKs of
//! one durable append go out in one write, and whatever one read brought
//! in is parsed in one go.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::{ConnectReturnCode, Login, Packet};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// From the TCP connect to the CONNACK.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A write the broker does not take within this long means a dead link.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest packet either way (the broker's default limit is larger; a
/// bigger telemetry message is a configuration mistake worth an error).
pub const MAX_PACKET: usize = 1 << 20;
/// What one read asks the kernel for: a few hundred telemetry messages.
const READ_CHUNK: usize = 64 * 1024;

/// Where and how to connect; built once from the source's configuration.
#[derive(Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub clean_session: bool,
    pub keep_alive: Duration,
    pub login: Option<Login>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{host} is not a valid TLS server name")]
    ServerName { host: String },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("the broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("the broker sent {0} before CONNACK")]
    NotConnAck(&'static str),
    #[error("no CONNACK within {0:?}")]
    OpenTimeout(Duration),
    #[error("malformed packet from the broker: {0}")]
    Malformed(CodecError),
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: CodecError,
    },
    #[error("the broker closed the connection")]
    Closed,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the broker took no data for {0:?}")]
    WriteTimeout(Duration),
    #[error("no PINGRESP within the keep alive ({0:?})")]
    KeepAlive(Duration),
    #[error("the buffer could not take messages; reconnecting so the broker redelivers them")]
    Redeliver,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub struct Connection {
    stream: Box<dyn Stream>,
    /// Bytes read and not parsed yet. Publishes' payloads are slices of it,
    /// so a chunk is freed when the last message read from it is.
    read_buf: BytesMut,
    write_buf: BytesMut,
}

impl Connection {
    /// Connects, sends CONNECT and waits for the CONNACK. Returns whether
    /// the broker had a session for this client id. Packets that came in
    /// right behind the CONNACK (a persistent session's queued messages)
    /// are kept for `read_packets`.
    pub async fn open(settings: &Settings) -> Result<(Self, bool), SessionError> {
        tokio::time::timeout(OPEN_TIMEOUT, Self::open_inner(settings))
            .await
            .map_err(|_| SessionError::OpenTimeout(OPEN_TIMEOUT))?
    }

    async fn open_inner(settings: &Settings) -> Result<(Self, bool), SessionError> {
        let addr = format!("{}:{}", settings.host, settings.port);
        let tcp = TcpStream::connect((settings.host.as_str(), settings.port))
            .await
            .map_err(|source| SessionError::Connect {
                addr: addr.clone(),
                source,
            })?;
        // Writes are whole batches of PUBACKs already: nothing to coalesce.
        tcp.set_nodelay(true)?;
        let stream: Box<dyn Stream> = match &settings.tls {
            Some(config) => {
                let name = ServerName::try_from(settings.host.clone()).map_err(|_| {
                    SessionError::ServerName {
                        host: settings.host.clone(),
                    }
                })?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|source| SessionError::Tls { addr, source })?;
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        let mut connection = Connection {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::with_capacity(4096),
        };
        let mut connect = rumqttc::Connect::new(settings.client_id.clone());
        connect.keep_alive = settings.keep_alive.as_secs().min(u16::MAX as u64) as u16;
        connect.clean_session = settings.clean_session;
        connect.login = settings.login.clone();
        connection.send(&[Packet::Connect(connect)]).await?;
        match connection.next_packet().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {
                Ok((connection, ack.session_present))
            }
            Packet::ConnAck(ack) => Err(SessionError::Refused(ack.code)),
            other => Err(SessionError::NotConnAck(kind(&other))),
        }
    }

    /// Encodes the packets and writes them with one write.
    pub async fn send(&mut self, packets: &[Packet]) -> Result<(), SessionError> {
        self.write_buf.clear();
        for packet in packets {
            packet
                .write(&mut self.write_buf, MAX_PACKET)
                .map_err(|source| SessionError::Encode {
                    what: kind(packet),
                    source,
                })?;
        }
        self.write_out().await
    }

    /// Writes one PUBACK for each packet id, in order, with one write (none
    /// for no ids).
    pub async fn acknowledge(&mut self, packet_ids: &[u16]) -> Result<(), SessionError> {
        if packet_ids.is_empty() {
            return Ok(());
        }
        self.write_buf.clear();
        self.write_buf.reserve(packet_ids.len() * 4);
        for &pkid in packet_ids {
            Packet::PubAck(rumqttc::PubAck::new(pkid))
                .write(&mut self.write_buf, MAX_PACKET)
                .map_err(|source| SessionError::Encode {
                    what: "PUBACK",
                    source,
                })?;
        }
        self.write_out().await
    }

    async fn write_out(&mut self) -> Result<(), SessionError> {
        let write = async {
            self.stream.write_all(&self.write_buf).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(WRITE_TIMEOUT, write)
            .await
            .map_err(|_| SessionError::WriteTimeout(WRITE_TIMEOUT))??;
        Ok(())
    }

    /// Appends up to `max` (at least one) whole packets the broker has sent
    /// to `out`, reading from the socket only when none is buffered; the
    /// rest stay in the buffer, unparsed, so a caller that stops asking
    /// holds no more than it asked for. Cancel safe: a cancelled read
    /// leaves what it had read in the buffer.
    pub async fn read_packets(
        &mut self,
        out: &mut Vec<Packet>,
        max: usize,
    ) -> Result<(), SessionError> {
        while self.parse_buffered(out, max.max(1))? == 0 {
            self.fill().await?;
        }
        Ok(())
    }

    async fn next_packet(&mut self) -> Result<Packet, SessionError> {
        loop {
            if let Some(packet) = self.parse_one()? {
                return Ok(packet);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), SessionError> {
        if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 4 {
            self.read_buf.reserve(READ_CHUNK);
        }
        if self.stream.read_buf(&mut self.read_buf).await? == 0 {
            return Err(SessionError::Closed);
        }
        Ok(())
    }

    fn parse_buffered(&mut self, out: &mut Vec<Packet>, max: usize) -> Result<usize, SessionError> {
        let before = out.len();
        while out.len() - before < max {
            match self.parse_one()? {
                Some(packet) => out.push(packet),
                None => break,
            }
        }
        Ok(out.len() - before)
    }

    fn parse_one(&mut self) -> Result<Option<Packet>, SessionError> {
        match Packet::read(&mut self.read_buf, MAX_PACKET) {
            Ok(packet) => Ok(Some(packet)),
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(SessionError::Malformed(e)),
        }
    }
}

/// A packet's name for error messages.
pub fn kind(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    //! A scripted peer on loopback stands in for the broker here: these
    //! tests need a broker that sends malformed packets, refuses a client
    //! or sends many packets in one write on cue, which Mosquitto does not
    //! do. Everything a real broker does is in tests/tests/mqtt_session.rs.

    use super::*;
    use rumqttc::{ConnAck, PubAck, Publish, QoS};
    use tokio::net::TcpListener;

    fn settings(port: u16) -> Settings {
        Settings {
            host: "127.0.0.1".into(),
            port,
            client_id: "unit".into(),
            clean_session: false,
            keep_alive: Duration::from_secs(30),
            login: None,
            tls: None,
        }
    }

    fn encode(packets: &[Packet]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        for packet in packets {
            packet.write(&mut buf, MAX_PACKET).unwrap();
        }
        buf.to_vec()
    }

    fn publish(pkid: u16) -> Packet {
        let mut publish = Publish::new("devices/d/telemetry", QoS::AtLeastOnce, vec![b'x'; 40]);
        publish.pkid = pkid;
        Packet::Publish(publish)
    }

    /// A peer that reads the CONNECT, writes `reply` in one write, then
    /// returns everything the client sends until it closes.
    async fn peer(reply: Vec<u8>) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        scripted_peer(reply, true).await
    }

    /// With `listen_on` false the peer closes right after its reply.
    async fn scripted_peer(
        reply: Vec<u8>,
        listen_on: bool,
    ) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut connect = BytesMut::new();
            while !matches!(
                Packet::read(&mut connect, MAX_PACKET),
                Ok(Packet::Connect(_))
            ) {
                assert!(socket.read_buf(&mut connect).await.unwrap() > 0);
            }
            socket.write_all(&reply).await.unwrap();
            let mut rest = Vec::new();
            if listen_on {
                let _ = socket.read_to_end(&mut rest).await;
            }
            rest
        });
        (port, task)
    }

    #[tokio::test]
    async fn packets_behind_the_connack_are_kept_and_handed_out_no_more_than_asked() {
        let mut reply = encode(&[Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            true,
        ))]);
        reply.extend(encode(&(1..=5).map(publish).collect::<Vec<_>>()));
        let (port, peer) = peer(reply).await;
        let (mut connection, session_present) = Connection::open(&settings(port)).await.unwrap();
        assert!(session_present);
        let mut got = Vec::new();
        for expected in [2, 2, 1] {
            let before = got.len();
            connection.read_packets(&mut got, 2).await.unwrap();
            assert_eq!(got.len() - before, expected);
        }
        let ids: Vec<u16> = got
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => p.pkid,
                other => panic!("{}", kind(other)),
            })
            .collect();
        assert_eq!(ids, [1, 2, 3, 4, 5]);
        // One write for all of them, in order.
        connection.acknowledge(&ids).await.unwrap();
        drop(connection);
        let sent = peer.await.unwrap();
        assert_eq!(
            sent,
            encode(
                &ids.iter()
                    .map(|&id| Packet::PubAck(PubAck::new(id)))
                    .collect::<Vec<_>>()
            )
        );
    }

    #[tokio::test]
    async fn a_refused_connection_says_why() {
        let reply = encode(&[Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::NotAuthorized,
            false,
        ))]);
        let (port, _peer) = peer(reply).await;
        let error = Connection::open(&settings(port)).await.err().unwrap();
        assert!(
            matches!(
                error,
                SessionError::Refused(ConnectReturnCode::NotAuthorized)
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_malformed_packet_is_an_error_not_a_panic() {
        let mut reply = encode(&[Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        ))]);
        // Packet type 0 is reserved; then a remaining length that never ends.
        reply.extend([0x00, 0x00]);
        let (port, _peer) = peer(reply).await;
        let (mut connection, _) = Connection::open(&settings(port)).await.unwrap();
        let error = connection
            .read_packets(&mut Vec::new(), 10)
            .await
            .unwrap_err();
        assert!(matches!(error, SessionError::Malformed(_)), "{error}");
        assert!(error
            .to_string()
            .starts_with("malformed packet from the broker"));
    }

    #[tokio::test]
    async fn a_closed_connection_and_a_first_packet_other_than_connack_are_named() {
        let (port, _peer) = peer(encode(&[publish(7)])).await;
        let error = Connection::open(&settings(port)).await.err().unwrap();
        assert!(
            matches!(error, SessionError::NotConnAck("PUBLISH")),
            "{error}"
        );

        let (port, _peer) = scripted_peer(Vec::new(), false).await;
        let error = Connection::open(&settings(port)).await.err().unwrap();
        assert!(matches!(error, SessionError::Closed), "{error}");
    }
}
