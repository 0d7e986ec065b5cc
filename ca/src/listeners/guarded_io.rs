//! [`Guarded`]: the stream wrapper that enforces a connection's deadlines, failing every
//! read and write once the connection is past them or closed for room, and whose
//! shutdown lingers ([`super::linger`]) so the server's last answer reaches the peer;
//! and its [`Connected`] impls, through which tonic's handlers find the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo, UdsConnectInfo};

use super::connection::{ConnHandle, ConnState};
use super::linger::Linger;

/// A connection's stream that fails every read and write once the connection is past
/// its deadline or closed for room, which makes the server drop it.
pub struct Guarded<IO> {
    io: IO,
    conn: ConnHandle,
    timer: Pin<Box<Sleep>>,
    armed_for: Option<Instant>,
    /// Set once the write side is shut down: the input drain that follows.
    linger: Option<Linger>,
}

impl<IO> Guarded<IO> {
    /// Guards `io` with the limits of its registered connection.
    pub fn new(io: IO, conn: ConnHandle) -> Self {
        Self {
            io,
            conn,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            armed_for: None,
            linger: None,
        }
    }

    /// The connection's state.
    pub fn state(&self) -> &Arc<ConnState> {
        &self.conn.state
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let state = &self.conn.state;
        state.waker.register(cx.waker());
        if let Some(why) = state.closing_reason() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, why));
        }
        let listener = &self.conn.listener;
        let (mut deadline, mut why) = state.deadline(&listener.timeouts);
        if let Some(s) = listener.shutdown_deadline() {
            if s < deadline {
                (deadline, why) = (s, "the server is stopping");
            }
        }
        let expired = Instant::now() >= deadline || {
            if self.armed_for != Some(deadline) {
                self.timer
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(deadline));
                self.armed_for = Some(deadline);
            }
            self.timer.as_mut().poll(cx).is_ready()
        };
        if expired {
            state.close(why);
            listener.count(|c| c.timed_out += 1);
            tracing::debug!(listener = listener.name, peer = %state.peer, reason = why, "connection closed");
            return Err(io::Error::new(io::ErrorKind::TimedOut, why));
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Shuts the write side down, then discards the peer's input for a bounded time
    /// (see [`super::linger`]), so that dropping the socket sends FIN, not RST. A
    /// connection past its deadline or closed for room is shut down without that.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.check(cx).is_err() {
            if this.linger.is_some() {
                return Poll::Ready(Ok(()));
            }
            return Pin::new(&mut this.io).poll_shutdown(cx);
        }
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.linger = Some(Linger::start());
        }
        match &mut this.linger {
            Some(linger) => linger.poll_drain(&mut this.io, cx).map(Ok),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Under TLS the peer is found by its address ([`TcpConnectInfo`] stays what tonic's
/// handlers expect, so `peer_certs()` and `remote_addr()` work unchanged).
impl Connected for Guarded<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// A connection's info with its state; [`TrackLayer`](super::TrackLayer) puts the plain info back.
#[derive(Clone)]
pub struct Tracked<T> {
    pub(super) info: T,
    pub(super) conn: Arc<ConnState>,
}

impl Connected for Guarded<UnixStream> {
    type ConnectInfo = Tracked<UdsConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        Tracked {
            info: self.io.connect_info(),
            conn: self.conn.state.clone(),
        }
    }
}
