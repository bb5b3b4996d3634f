//! SocketCAN source: one per configured interface (`can0`, `vcan1`...),
//! classical CAN or CAN FD (`fd: true`), decoded with the interface's DBC
//! files into one record per frame (see `can_records.rs` for the mapping).
//!
//! Two tasks per interface: a reader that drains the socket into a bounded
//! queue, and an appender that decodes, reduces and appends to the buffer in
//! groups (everything that arrived within [`BATCH_WINDOW`], at most
//! [`MAX_FRAMES_PER_APPEND`]), so one fsync covers many frames.
//!
//! A bus cannot be asked to resend, so there is nothing to acknowledge: a
//! record is simply written. When the buffer blocks (policy `block`, buffer
//! full) the queue fills, the reader waits, and the kernel's socket queue
//! overflows; the kernel counts those drops per socket, and the reader copies
//! that count (`SO_MEMINFO`) into `dropped_records{reason="can_socket_overflow"}`.
//!
//! Failures never take the agent down:
//! * a DBC that does not load is logged with file and line, and the source
//!   stays down until one of the files changes (or the config does);
//! * a missing interface is retried with backoff (`source_reconnects`);
//! * an interface going down (`ip link set can0 down`, or a controller
//!   restart after bus-off) keeps the socket: it stays bound to the
//!   interface and receives again as soon as it is up, so no frame sent
//!   after the interface is back is missed by a reopen delay; the state
//!   (read from the interface flags each second) shows in `source_up`;
//! * an interface that disappears (unregistered) is reopened with backoff.
//!
//! Error frames are requested from the kernel and counted by class
//! (`can_error_frames{class="bus_off"|"controller"|...}`); bus-off is also
//! logged. Recovering from bus-off is the driver's job (`restart-ms`).

use std::io;
use std::time::{Duration, SystemTime};

use edgefleet_can::CanFrame;
use edgefleet_config::{CanFilter as FilterConfig, CanSource as CanConfig};
use edgefleet_proto::EncodedRecord;
use futures::future::BoxFuture;
use socketcan::{CanAnyFrame, CanTimestamps, EmbeddedFrame, Frame, SocketOptions};
use tokio::sync::mpsc;

use super::can_records::{self, FrameMapper, Tally, CAN_ERR_BUSOFF};
use super::{Source, SourceContext, SourceError};
use crate::uplink::Backoff;

/// Frames taken into one append at most.
const MAX_FRAMES_PER_APPEND: usize = 4096;
/// How long the first frame of a group waits for company.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Frames held between reader and appender: the agent's share of the
/// cushion for a slow fsync (the kernel socket queue holds only a few
/// hundred frames).
const QUEUE_FRAMES: usize = 16_384;
/// Kernel receive queue asked for per socket (the kernel doubles it for
/// bookkeeping): several seconds of a saturated 500 kbit/s bus.
const RECEIVE_QUEUE_BYTES: libc::c_int = 2 << 20;
/// How often the kernel's drop counter is read.
const DROP_POLL: Duration = Duration::from_secs(1);

/// `CAN_EFF_FLAG`: in a kernel filter, makes the filter match only extended
/// (set in id and mask) or only standard (set in the mask only) frames.
const CAN_EFF_FLAG: u32 = 0x8000_0000;

pub struct CanSource {
    config: CanConfig,
}

impl CanSource {
    pub fn new(config: CanConfig) -> Self {
        Self { config }
    }
}

impl Source for CanSource {
    fn name(&self) -> &str {
        &self.config.interface
    }

    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(run(self.config, ctx))
    }
}

/// A received frame and its time (ns since the Unix epoch).
struct Received {
    frame: CanFrame,
    t_ns: i64,
}

async fn run(config: CanConfig, ctx: SourceContext) -> Result<(), SourceError> {
    let name = config.interface.clone();
    let Some((decoder, reduction)) =
        can_records::decoder_and_reduction(&ctx, &name, &config.dbc, &config.reduction).await
    else {
        return Ok(());
    };
    let mut mapper = FrameMapper::new(name.clone(), decoder, reduction, config.unknown_frames);
    let (tx, mut rx) = mpsc::channel::<Received>(QUEUE_FRAMES);
    let reader = tokio::spawn(read_loop(config, ctx.clone(), tx));

    let mut tally = Tally::default();
    let mut batch: Vec<Received> = Vec::with_capacity(MAX_FRAMES_PER_APPEND);
    let mut records: Vec<EncodedRecord> = Vec::with_capacity(MAX_FRAMES_PER_APPEND);
    // Runs until the reader stops (on shutdown) and its queue is drained, so
    // frames already taken off the socket are still written.
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let window = tokio::time::sleep(BATCH_WINDOW);
        tokio::pin!(window);
        'fill: while batch.len() < MAX_FRAMES_PER_APPEND {
            while batch.len() < MAX_FRAMES_PER_APPEND {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if batch.len() >= MAX_FRAMES_PER_APPEND {
                break;
            }
            tokio::select! {
                biased;
                r = rx.recv() => match r {
                    Some(r) => batch.push(r),
                    None => break 'fill,
                },
                _ = &mut window => break 'fill,
            }
        }
        for r in batch.drain(..) {
            let outcome = mapper.map(&r.frame, r.t_ns, &mut records);
            if let can_records::FrameOutcome::Error(class) = outcome {
                if class & CAN_ERR_BUSOFF != 0 {
                    tracing::warn!(source = %name, "CAN controller is bus-off");
                }
            }
            tally.add(outcome);
        }
        tally.flush(&ctx.metrics, &name);
        if !can_records::append(&ctx, &name, std::mem::take(&mut records)).await {
            break;
        }
    }
    reader.abort();
    ctx.metrics.source_up(&name, false);
    Ok(())
}

/// The two kinds of socket, behind one read call.
enum Socket {
    Classic(socketcan::tokio::CanSocket),
    Fd(socketcan::tokio::CanFdSocket),
}

impl Socket {
    fn open(config: &CanConfig) -> io::Result<Self> {
        if config.fd {
            let s = socketcan::tokio::CanFdSocket::open(&config.interface)?;
            configure(&s, config)?;
            Ok(Socket::Fd(s))
        } else {
            let s = socketcan::tokio::CanSocket::open(&config.interface)?;
            configure(&s, config)?;
            Ok(Socket::Classic(s))
        }
    }

    async fn read(&self) -> io::Result<(Option<CanFrame>, CanTimestamps)> {
        match self {
            Socket::Classic(s) => {
                let (f, ts) = s.read_frame_with_timestamps().await?;
                Ok((convert_classic(&f), ts))
            }
            Socket::Fd(s) => {
                let (f, ts) = s.read_frame_with_timestamps().await?;
                Ok((convert_any(&f), ts))
            }
        }
    }

    /// The socket's receive queue size as the kernel reports it.
    fn receive_queue_bytes(&self) -> Option<u64> {
        let mut buf = [0u8; 4];
        let n = match self {
            Socket::Classic(s) => {
                s.get_socket_option_bytes(libc::SOL_SOCKET, libc::SO_RCVBUF, &mut buf)
            }
            Socket::Fd(s) => s.get_socket_option_bytes(libc::SOL_SOCKET, libc::SO_RCVBUF, &mut buf),
        }
        .ok()?;
        (n == 4).then(|| u64::from(u32::from_ne_bytes(buf)))
    }

    /// The kernel's count of frames this socket dropped because its receive
    /// queue was full (`sk_drops`, via `SO_MEMINFO`), if available.
    fn kernel_drops(&self) -> Option<u64> {
        match self {
            Socket::Classic(s) => kernel_drops(s),
            Socket::Fd(s) => kernel_drops(s),
        }
    }
}

/// Kernel filters, error frames and receive timestamps.
fn configure(socket: &impl SocketOptions, config: &CanConfig) -> io::Result<()> {
    if !config.filters.is_empty() {
        let filters: Vec<socketcan::CanFilter> = config.filters.iter().map(kernel_filter).collect();
        socket.set_filters(&filters)?;
    }
    socket.set_error_filter_accept_all()?;
    // The default receive queue (rmem_default, ~300 frames) covers well under
    // a second of a busy bus: a scheduling hiccup on a small board would cost
    // frames. SO_RCVBUFFORCE passes net.core.rmem_max but needs
    // CAP_NET_ADMIN, which the shipped deployments do not grant; SO_RCVBUF
    // then gets at most rmem_max, so gateways raise that sysctl (see
    // deploy/k3s/README.md). The size obtained is logged at open.
    if socket
        .set_socket_option_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RECEIVE_QUEUE_BYTES)
        .is_err()
    {
        let _ =
            socket.set_socket_option_int(libc::SOL_SOCKET, libc::SO_RCVBUF, RECEIVE_QUEUE_BYTES);
    }
    // Kernel receive time, taken when the frame entered the stack: closer to
    // the bus than anything measured after the queue.
    socket.set_recv_timestamp(true)?;
    Ok(())
}

fn kernel_drops(socket: &impl SocketOptions) -> Option<u64> {
    let mut buf = [0u8; 4 * (libc::SK_MEMINFO_DROPS as usize + 1)];
    let n = socket
        .get_socket_option_bytes(libc::SOL_SOCKET, SO_MEMINFO, &mut buf)
        .ok()?;
    let at = 4 * libc::SK_MEMINFO_DROPS as usize;
    if n < at + 4 {
        return None;
    }
    let bytes: [u8; 4] = buf[at..at + 4].try_into().ok()?;
    Some(u32::from_ne_bytes(bytes).into())
}

/// `SO_MEMINFO` (Linux ≥ 4.12; 55 on every architecture we ship for).
const SO_MEMINFO: libc::c_int = 55;

/// Config filter → kernel filter. The EFF flag in the mask makes a filter
/// match one kind of identifier only, so a standard filter for 0x123 does
/// not also accept extended id 0x123.
fn kernel_filter(f: &FilterConfig) -> socketcan::CanFilter {
    if f.extended {
        socketcan::CanFilter::new(f.id | CAN_EFF_FLAG, f.mask | CAN_EFF_FLAG)
    } else {
        socketcan::CanFilter::new(f.id & 0x7FF, (f.mask & 0x7FF) | CAN_EFF_FLAG)
    }
}

fn convert_classic(f: &socketcan::CanFrame) -> Option<CanFrame> {
    match f {
        socketcan::CanFrame::Data(d) => CanFrame::new(d.raw_id(), d.is_extended(), d.data()).ok(),
        socketcan::CanFrame::Remote(r) => {
            CanFrame::new_remote(r.raw_id(), r.is_extended(), r.dlc() as u8).ok()
        }
        socketcan::CanFrame::Error(e) => CanFrame::new_error(e.error_bits(), e.data()).ok(),
    }
}

fn convert_any(f: &CanAnyFrame) -> Option<CanFrame> {
    match f {
        CanAnyFrame::Normal(d) => CanFrame::new(d.raw_id(), d.is_extended(), d.data()).ok(),
        CanAnyFrame::Remote(r) => {
            CanFrame::new_remote(r.raw_id(), r.is_extended(), r.dlc() as u8).ok()
        }
        CanAnyFrame::Error(e) => CanFrame::new_error(e.error_bits(), e.data()).ok(),
        CanAnyFrame::Fd(d) => CanFrame::new_fd(
            d.raw_id(),
            d.is_extended(),
            d.data(),
            d.is_brs(),
            d.is_esi(),
        )
        .ok(),
    }
}

fn time_ns(ts: &CanTimestamps) -> i64 {
    ts.socket
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_else(crate::now_ns)
}

/// Opens the socket (retrying with backoff) and moves frames into `tx` until
/// shutdown or until the appender is gone.
async fn read_loop(config: CanConfig, ctx: SourceContext, tx: mpsc::Sender<Received>) {
    let name = config.interface.clone();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    'open: loop {
        let socket = match Socket::open(&config) {
            Ok(s) => s,
            Err(e) => {
                ctx.metrics.source_up(&name, false);
                ctx.metrics.source_reconnect(&name);
                let delay = backoff.next_delay();
                tracing::warn!(source = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot open CAN interface");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue 'open,
                }
            }
        };
        tracing::info!(source = %name, fd = config.fd, filters = config.filters.len(), receive_queue_bytes = socket.receive_queue_bytes(), "CAN interface open");
        ctx.metrics.source_up(&name, true);
        let mut up = true;
        // The backoff resets on the first frame, not at open: an interface
        // that opens and fails at once must not be retried in a tight loop.
        let mut first_frame = true;
        let mut drops_seen = socket.kernel_drops().unwrap_or(0);
        let mut drop_poll = tokio::time::interval(DROP_POLL);
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => {
                    count_drops(&socket, &mut drops_seen, &ctx, &name);
                    return;
                }
                _ = drop_poll.tick() => {
                    count_drops(&socket, &mut drops_seen, &ctx, &name);
                    // A down interface makes reads wait rather than fail
                    // (vcan, and real controllers that go quiet), so the
                    // link state is also read from its flags.
                    match link_is_up(&name) {
                        Some(false) if up => {
                            up = false;
                            ctx.metrics.source_up(&name, false);
                            tracing::warn!(source = %name, "CAN interface is down; waiting for it to come back");
                        }
                        Some(true) if !up => {
                            up = true;
                            ctx.metrics.source_up(&name, true);
                            tracing::info!(source = %name, "CAN interface is up again");
                        }
                        _ => {}
                    }
                }
                read = socket.read() => match read {
                    Ok((Some(frame), ts)) => {
                        if std::mem::take(&mut first_frame) {
                            backoff.reset();
                        }
                        if !up {
                            up = true;
                            ctx.metrics.source_up(&name, true);
                            tracing::info!(source = %name, "CAN interface receiving again");
                        }
                        let received = Received { frame, t_ns: time_ns(&ts) };
                        // Waits when the appender is behind (buffer blocked):
                        // the kernel queue takes the overflow, and counts it.
                        if tx.send(received).await.is_err() {
                            return;
                        }
                    }
                    // A frame the kernel delivered but that is not valid CAN
                    // (cannot happen with a sane driver): skip it.
                    Ok((None, _)) => ctx.metrics.decode_error(&name),
                    Err(e) if e.raw_os_error() == Some(libc::ENETDOWN) => {
                        // The socket stays bound and receives again once the
                        // interface is up: keep reading it.
                        if up {
                            up = false;
                            ctx.metrics.source_up(&name, false);
                            tracing::warn!(source = %name, "CAN interface is down; waiting for it to come back");
                        }
                    }
                    Err(e) => {
                        ctx.metrics.source_up(&name, false);
                        ctx.metrics.source_reconnect(&name);
                        let delay = backoff.next_delay();
                        tracing::warn!(source = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "CAN read failed; reopening");
                        count_drops(&socket, &mut drops_seen, &ctx, &name);
                        drop(socket);
                        tokio::select! {
                            _ = ctx.shutdown.cancelled() => return,
                            _ = tokio::time::sleep(delay) => continue 'open,
                        }
                    }
                },
            }
        }
    }
}

/// Whether the interface is administratively up (`IFF_UP` in
/// `/sys/class/net/<iface>/flags`); `None` when that cannot be read (no
/// sysfs, or the interface is gone, which the next read reports).
fn link_is_up(iface: &str) -> Option<bool> {
    let flags = std::fs::read_to_string(format!("/sys/class/net/{iface}/flags")).ok()?;
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).ok()?;
    Some(flags & libc::IFF_UP as u32 != 0)
}

fn count_drops(socket: &Socket, seen: &mut u64, ctx: &SourceContext, name: &str) {
    if let Some(now) = socket.kernel_drops() {
        if now > *seen {
            let n = now - *seen;
            tracing::warn!(source = %name, frames = n, "CAN socket queue overflowed: the kernel dropped frames");
            ctx.metrics.dropped("can_socket_overflow", n);
        }
        *seen = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(id: u32, mask: u32, extended: bool) -> FilterConfig {
        FilterConfig { id, mask, extended }
    }

    /// What the kernel does with a filter (`net/can/af_can.c`): a frame
    /// matches when `can_id & mask == filter_id & mask`.
    fn matches(f: &socketcan::CanFilter, can_id: u32) -> bool {
        let raw: &libc::can_filter = f.as_ref();
        can_id & raw.can_mask == raw.can_id & raw.can_mask
    }

    #[test]
    fn kernel_filters_keep_standard_and_extended_apart() {
        let std_filter = kernel_filter(&filter(0x123, 0x1FFF_FFFF, false));
        assert!(matches(&std_filter, 0x123));
        assert!(!matches(&std_filter, 0x124));
        assert!(!matches(&std_filter, 0x123 | CAN_EFF_FLAG));
        let ext_filter = kernel_filter(&filter(0x18FE_0000, 0x1FFF_0000, true));
        assert!(matches(&ext_filter, 0x18FE_1234 | CAN_EFF_FLAG));
        assert!(!matches(&ext_filter, 0x18FF_1234 | CAN_EFF_FLAG));
        assert!(!matches(&ext_filter, 0x123));
        // A range of standard ids by mask.
        let range = kernel_filter(&filter(0x100, 0x700, false));
        assert!(matches(&range, 0x1AB));
        assert!(!matches(&range, 0x2AB));
    }

    #[test]
    fn socketcan_frames_convert_without_loss() {
        let data = socketcan::CanFrame::Data(
            socketcan::CanDataFrame::new(
                socketcan::ExtendedId::new(0x1ABC_DEF0).unwrap(),
                &[1, 2, 3],
            )
            .unwrap(),
        );
        let f = convert_classic(&data).unwrap();
        assert_eq!(
            (f.id(), f.is_extended(), f.data()),
            (0x1ABC_DEF0, true, &[1u8, 2, 3][..])
        );

        let err = socketcan::CanErrorFrame::new_error(0x040, &[0; 8]).unwrap();
        let f = convert_classic(&socketcan::CanFrame::Error(err)).unwrap();
        assert!(f.is_error());
        assert_eq!(f.id(), CAN_ERR_BUSOFF);

        let fd = socketcan::CanFdFrame::with_flags(
            socketcan::StandardId::new(0x42).unwrap(),
            &[9; 24],
            socketcan::id::FdFlags::BRS,
        )
        .unwrap();
        let f = convert_any(&CanAnyFrame::Fd(fd)).unwrap();
        assert!(f.is_fd() && f.brs() && !f.esi());
        assert_eq!(f.len(), 24);
    }

    #[test]
    fn kernel_timestamp_wins_over_now() {
        let ts = CanTimestamps {
            socket: Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_123)),
            ..Default::default()
        };
        assert_eq!(time_ns(&ts), 1_700_000_000_000_000_123);
        let none = time_ns(&CanTimestamps::default());
        assert!((none - crate::now_ns()).abs() < 5_000_000_000);
    }
}
