//! [`Linger`]: the end of a connection the server closes. Dropping a TCP socket whose
//! receive buffer still holds input makes the kernel send RST instead of FIN and
//! discard what it had not sent yet; and a client that writes before it reads (as a
//! TLS stream with pending output does) then fails before it sees the server's last
//! answer: an HTTP/2 GOAWAY, a 413 sent before the body was read. So
//! [`Guarded`](super::Guarded)'s shutdown closes the write side first (FIN; under TLS,
//! after `close_notify`), then reads and discards what the peer still sends until it
//! closes its side, for at most [`LINGER`] and [`LINGER_BYTES`], before the socket is
//! dropped. A connection past its deadline or closed for room does not linger.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Sleep;

/// How long a closing connection keeps discarding its peer's input, at most.
pub const LINGER: Duration = Duration::from_secs(1);
/// How much of its peer's input a closing connection discards, at most. Input a client
/// queued before it saw the end (a flood the server was reading behind) sits in the
/// kernel's receive buffer, often more than 64 KiB, and must be read for the close to
/// be a FIN; discarding is cheaper than anything the server does with live input.
pub const LINGER_BYTES: usize = 1024 * 1024;

/// The drain of one closing connection: its deadline and what it discarded so far.
pub(super) struct Linger {
    deadline: Pin<Box<Sleep>>,
    discarded: usize,
    done: bool,
}

impl Linger {
    /// Starts lingering now.
    pub(super) fn start() -> Self {
        Self {
            deadline: Box::pin(tokio::time::sleep(LINGER)),
            discarded: 0,
            done: false,
        }
    }

    /// Reads and discards `io`'s input; ready once the peer closed its side, a read
    /// failed, or the time or byte bound is reached (and ever after).
    pub(super) fn poll_drain<IO: AsyncRead + Unpin>(
        &mut self,
        io: &mut IO,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let mut buf = [0u8; 8192];
        while !self.done {
            if self.discarded >= LINGER_BYTES || self.deadline.as_mut().poll(cx).is_ready() {
                self.done = true;
                break;
            }
            let mut read = ReadBuf::new(&mut buf);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if read.filled().is_empty() => self.done = true,
                Poll::Ready(Ok(())) => {
                    self.discarded = self.discarded.saturating_add(read.filled().len())
                }
                Poll::Ready(Err(_)) => self.done = true,
            }
        }
        Poll::Ready(())
    }
}
