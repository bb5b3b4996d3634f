//! Our own accept loop in front of tonic.
//!
//! tonic can terminate TLS itself, but then a failed handshake is invisible:
//! no peer address, no reason, no metric. Accepting here lets us log and
//! count every rejected handshake, bound its duration, and read the agent's
//! identity from its certificate once per connection. The result reaches
//! handlers as [`AgentConnectInfo`] in the request extensions (tonic inserts
//! whatever [`Connected::connect_info`] returns).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

use crate::metrics::{Metrics, Reject};

/// Handshakes in progress at once; beyond this new connections are dropped
/// (and counted) rather than queued, so a flood cannot grow memory unboundedly.
const MAX_CONCURRENT_HANDSHAKES: usize = 1024;

/// What a handler knows about the connection a request came on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConnectInfo {
    /// Whom the client certificate speaks for; `None` in plaintext dev mode,
    /// where the session takes the agent id from `Hello`.
    pub principal: Option<edgefleet_pki::Principal>,
    pub remote_addr: SocketAddr,
}

/// An accepted connection: TLS (with a verified client certificate) or, in
/// dev mode, plain TCP. Counts the bytes it reads.
pub struct AgentConn {
    io: Io,
    info: AgentConnectInfo,
    bytes_received: Counter,
}

enum Io {
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl Connected for AgentConn {
    type ConnectInfo = AgentConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for AgentConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = match &mut this.io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
        };
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            this.bytes_received.inc_by(read as u64);
        }
        result
    }
}

impl AsyncWrite for AgentConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tls(s) => s.is_write_vectored(),
            Io::Plain(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The stream of accepted connections handed to tonic.
pub type Incoming = ReceiverStream<Result<AgentConn, io::Error>>;

/// Accepts on `listener` until `stop` is cancelled (then closes the listening
/// socket). Each TLS handshake runs in its own task under `handshake_timeout`,
/// so slow or silent clients never hold up the accept loop. `tls: None` is
/// the plaintext dev mode.
pub fn accept(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Incoming {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tls.map(TlsAcceptor::from);
    let handshakes = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = acceptor.clone() else {
                let conn = AgentConn {
                    io: Io::Plain(tcp),
                    info: AgentConnectInfo {
                        principal: None,
                        remote_addr: peer,
                    },
                    bytes_received: metrics.bytes_received.clone(),
                };
                if tx.send(Ok(conn)).await.is_err() {
                    break;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                warn!(%peer, "too many TLS handshakes in progress; dropping the connection");
                metrics.reject(Reject::HandshakeOverload);
                continue;
            };
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(conn) =
                    handshake(acceptor, tcp, peer, handshake_timeout, &metrics).await
                {
                    // The receiver is gone only when the server is shutting down.
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
        debug!("accept loop stopped");
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
    metrics: &Metrics,
) -> Option<AgentConn> {
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Err(_) => {
            warn!(%peer, reason = Reject::HandshakeTimeout.label(), "TLS handshake rejected: not finished within {timeout:?}");
            metrics.reject(Reject::HandshakeTimeout);
            return None;
        }
        Ok(Err(e)) => {
            let reason = classify(&e);
            warn!(%peer, reason = reason.label(), error = %e, "TLS handshake rejected");
            metrics.reject(reason);
            return None;
        }
        Ok(Ok(stream)) => stream,
    };
    // The verifier made a certificate mandatory; its absence here would be a
    // configuration bug, and is refused like any other identity problem.
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| "no client certificate".to_string())
        .and_then(|leaf| edgefleet_pki::agent_identity(leaf).map_err(|e| e.to_string()));
    let identity = match identity {
        Ok(identity) => identity,
        Err(e) => {
            warn!(%peer, reason = Reject::NoIdentity.label(), error = %e, "TLS client rejected: certificate carries no agent identity");
            metrics.reject(Reject::NoIdentity);
            return None;
        }
    };
    info!(%peer, principal = %identity.principal, "TLS client authenticated");
    Some(AgentConn {
        io: Io::Tls(Box::new(stream)),
        info: AgentConnectInfo {
            principal: Some(identity.principal),
            remote_addr: peer,
        },
        bytes_received: metrics.bytes_received.clone(),
    })
}

/// Maps a failed handshake to a metric reason. tokio-rustls wraps rustls
/// errors in `io::Error`, so the rustls reason is recovered by downcasting.
fn classify(e: &io::Error) -> Reject {
    use rustls::{CertificateError as C, Error as E};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => Reject::NoCertificate,
        // A bad signature means a CA with the same name as ours but another
        // key issued it (webpki finds issuers by name): just as unknown.
        Some(E::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => Reject::UnknownCa,
        Some(E::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => {
            Reject::ExpiredCertificate
        }
        Some(E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. })) => {
            Reject::CertificateNotYetValid
        }
        Some(E::InvalidCertificate(C::Revoked)) => Reject::RevokedCertificate,
        Some(E::InvalidCertificate(_)) => Reject::BadCertificate,
        Some(E::NoApplicationProtocol) => Reject::NoAlpn,
        Some(E::AlertReceived(_)) => Reject::ClientAlert,
        Some(_) => Reject::TlsError,
        None if e.kind() == io::ErrorKind::UnexpectedEof => Reject::HandshakeEof,
        None => Reject::TlsError,
    }
}
