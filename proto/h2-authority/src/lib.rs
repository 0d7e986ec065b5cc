//! A read-side connection adapter that lets grpc-core clients talk to tonic on a Unix socket.
//!
//! grpc-core clients (Python grpcio / py-spiffe, grpc-java, grpcurl) send the socket path as the
//! HTTP/2 `:authority` pseudo-header, percent-encoded and without its leading slash
//! (`tmp%2Fx%2Fapi.sock`). `h2`, under hyper and tonic, parses `:authority` with
//! [`http::uri::Authority`] and resets every such stream with RST_STREAM(PROTOCOL_ERROR)
//! (hyperium/h2#487). [`AuthorityFixingStream`] sits between the accepted socket and h2 and
//! rewrites an unparseable `:authority` to `localhost` before h2 sees it.
//!
//! How it works (design: `grpc-uds-authority.md`, "FirstBlock" mode):
//!
//! - Writes (server to client) are delegated untouched.
//! - Reads (client to server) go through a small HTTP/2 frame parser. Frames other than
//!   HEADERS/CONTINUATION are forwarded without looking at their payload.
//! - The connection's first header block is HPACK-decoded. If its `:authority` parses (or is
//!   absent), that block's original bytes are forwarded and the rest of the connection passes
//!   through raw, at no cost. A scanner ([`first_block`]) decides this common case without a full
//!   decode (it decodes only `:authority` values); whatever it does not vouch for goes through
//!   the full decoder, whose outcome (passthrough, rewrite or error) is the reference.
//! - Otherwise the connection switches, for good, to rewriting: every header block is decoded with
//!   the same persistent HPACK decoder and re-encoded with literals that never touch h2's dynamic
//!   table, with a bad `:authority` replaced by `localhost`. The switch can only go one way: once
//!   h2 has missed the client's table insertions, raw blocks would index the wrong entries.
//!
//! Because the adapter merges and re-splits header frames, it re-imposes h2's protections itself:
//! by default at most 1 MiB per header block, at most 1,280 CONTINUATION frames per block and at
//! most 16 MiB of decoded header list. A server that holds h2 to a smaller header list should
//! hold the adapter to it too ([`AuthorityFixingStream::with_limits`]): the adapter buffers a
//! header block whole before h2 sees any of it, so a client that sends most of a block and stops
//! holds the block's bytes (twice while the first block is judged) for as long as the connection
//! lives. Violations, HPACK errors and truncated input surface as an [`io::Error`] from
//! `poll_read`, which closes the connection (without a GOAWAY).
//!
//! ```text
//! // Serving tonic on a Unix socket with the adapter:
//! let incoming = UnixListenerStream::new(listener).map(|r| r.map(wrap_unix));
//! Server::builder().add_service(svc).serve_with_incoming(incoming).await?;
//! ```
#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::uri::Authority;
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

mod first_block;

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;

const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Stream dependency (4 bytes) plus weight (1 byte) of a HEADERS frame with PRIORITY.
const PRIORITY_LEN: usize = 5;
/// Largest frame payload we emit: the HTTP/2 default SETTINGS_MAX_FRAME_SIZE, which every peer
/// accepts (hyper/tonic do not raise or lower it for what they receive below this).
const MAX_OUT_FRAME: usize = 16_384;
/// HPACK dynamic table limit. hyper/tonic never send SETTINGS_HEADER_TABLE_SIZE, so h2 enforces
/// the protocol default; a client may not grow the table beyond it.
const HPACK_TABLE_SIZE: usize = 4096;
/// Largest header block (sum of fragments) we buffer, by default.
const MAX_BLOCK_BYTES: usize = 1 << 20;
/// Most CONTINUATION frames per header block (CONTINUATION-flood protection).
const MAX_CONTINUATIONS: usize = 1280;
/// Most decoded header-list bytes per block (RFC 7541 size: name + value + 32 per field), by
/// default. Counted while decoding, since tiny indexed references can expand enormously.
const MAX_HEADER_LIST_BYTES: usize = 16 << 20;
/// Per-field overhead in the RFC 7541 header-list size.
const FIELD_OVERHEAD: usize = 32;
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// Granularity of reads from the socket into the parser's input buffer.
const READ_CHUNK: usize = 16 * 1024;
/// Buffers grown past this (by a large header block) are released once drained.
const KEEP_CAPACITY: usize = 64 * 1024;

/// An accepted connection whose client-to-server bytes get an unparseable HTTP/2 `:authority`
/// rewritten to `localhost`, so that h2 (and thus tonic) accepts requests from grpc-core clients.
///
/// Writes are passed through unchanged, and [`Connected::connect_info`] is forwarded to the inner
/// stream, so e.g. tonic's `UdsConnectInfo` (peer credentials) still reaches request handlers.
/// See the [module documentation](self) for how the rewriting works and its limits.
pub struct AuthorityFixingStream<S> {
    inner: S,
    read: ReadSide,
}

/// What the adapter holds a client's header blocks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Bytes of one header block (the sum of its fragments), at most.
    pub max_block_bytes: usize,
    /// Decoded header-list bytes of one block (RFC 7541: name + value + 32 per field), at most.
    pub max_header_list_bytes: usize,
}

impl Limits {
    /// Limits for a server that holds h2 to `max_header_list_bytes` of header list. A block's
    /// encoded bytes are held to the same figure: a client's encoder never needs more bytes for
    /// a field than the list size counts for it (name + value + 32), as it uses Huffman coding
    /// only where that is shorter.
    pub const fn for_header_list(max_header_list_bytes: usize) -> Self {
        Self {
            max_block_bytes: max_header_list_bytes,
            max_header_list_bytes,
        }
    }
}

impl Default for Limits {
    /// h2's own defaults.
    fn default() -> Self {
        Self {
            max_block_bytes: MAX_BLOCK_BYTES,
            max_header_list_bytes: MAX_HEADER_LIST_BYTES,
        }
    }
}

impl<S> AuthorityFixingStream<S> {
    /// Wraps a freshly accepted connection. The adapter must see the connection from its first
    /// byte: it tracks the client's HPACK state from the start.
    pub fn new(inner: S) -> Self {
        Self::with_limits(inner, Limits::default())
    }

    /// As [`AuthorityFixingStream::new`], with the header blocks held to `limits`.
    pub fn with_limits(inner: S, limits: Limits) -> Self {
        Self {
            inner,
            read: ReadSide::new(limits),
        }
    }

    /// Returns the wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Wraps an accepted Unix socket connection; convenient as
/// `UnixListenerStream::new(l).map(|r| r.map(wrap_unix))` for tonic's `serve_with_incoming`.
pub fn wrap_unix(stream: tokio::net::UnixStream) -> AuthorityFixingStream<tokio::net::UnixStream> {
    AuthorityFixingStream::new(stream)
}

impl<S: fmt::Debug> fmt::Debug for AuthorityFixingStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorityFixingStream")
            .field("inner", &self.inner)
            .field("mode", &self.read.parser.mode)
            .finish_non_exhaustive()
    }
}

impl<S: Connected> Connected for AuthorityFixingStream<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFixingStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.read.poll_read(&mut this.inner, cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFixingStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Everything on the client-to-server side: raw input, the parser, and error state.
struct ReadSide {
    input: InputBuf,
    parser: Parser,
    eof: bool,
    /// Set after an error: the parser's state is then meaningless, so keep failing.
    failed: bool,
}

impl ReadSide {
    fn new(limits: Limits) -> Self {
        Self {
            input: InputBuf::default(),
            parser: Parser::new(limits),
            eof: false,
            failed: false,
        }
    }

    fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        inner: &mut S,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.failed {
            return Poll::Ready(Err(invalid_data("connection already failed")));
        }
        let result = ready!(self.poll_read_inner(inner, cx, buf));
        if result.is_err() {
            self.failed = true;
        }
        Poll::Ready(result)
    }

    fn poll_read_inner<S: AsyncRead + Unpin>(
        &mut self,
        inner: &mut S,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.parser.has_output() {
                self.parser.take_output(buf);
                return Poll::Ready(Ok(()));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(if self.input.is_empty() && self.parser.at_boundary() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of an HTTP/2 frame",
                    ))
                });
            }
            // Nothing is buffered and the next bytes need no parsing: read them straight into
            // the caller's buffer, saving a copy (this is every read once in passthrough).
            if self.input.is_empty() {
                if let Some(limit) = self.parser.direct_read_limit() {
                    let n = if limit >= buf.remaining() {
                        let before = buf.filled().len();
                        ready!(Pin::new(&mut *inner).poll_read(cx, buf))?;
                        buf.filled().len() - before
                    } else {
                        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(limit));
                        ready!(Pin::new(&mut *inner).poll_read(cx, &mut limited))?;
                        let n = limited.filled().len();
                        buf.advance(n);
                        n
                    };
                    if n == 0 {
                        self.eof = true;
                        continue;
                    }
                    self.parser.consumed_directly(n);
                    return Poll::Ready(Ok(()));
                }
            }
            let n = ready!(self.input.poll_fill(inner, cx))?;
            if n == 0 {
                self.eof = true;
            }
            let used = self.parser.feed(self.input.data())?;
            self.input.consume(used);
        }
    }
}

/// Bytes read from the socket but not yet consumed by the parser. A plain `Vec` with a window,
/// so reads need no zeroing after the first growth and consumption never reallocates.
#[derive(Default)]
struct InputBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl InputBuf {
    #[allow(
        clippy::indexing_slicing,
        reason = "start <= end <= buf.len(): consume clamps start to end, poll_fill only moves end past bytes read into buf[end..]"
    )]
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }

    #[allow(
        clippy::indexing_slicing,
        reason = "end <= buf.len() always, and buf is grown right above when end == buf.len()"
    )]
    fn poll_fill<S: AsyncRead + Unpin>(
        &mut self,
        inner: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.is_empty() {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > KEEP_CAPACITY {
                self.buf = Vec::new();
            }
        }
        if self.end == self.buf.len() {
            // Full: slide the data to the front if that frees at least half, else grow.
            if self.start >= self.buf.len() / 2 && self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = (self.buf.len() * 2).max(READ_CHUNK);
                self.buf.resize(grown, 0);
            }
        }
        let mut read_buf = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(inner).poll_read(cx, &mut read_buf))?;
        let n = read_buf.filled().len();
        self.end += n;
        Poll::Ready(Ok(n))
    }
}

/// What the parser does with header blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Waiting for the first header block to decide.
    Inspect,
    /// The first block had a bad `:authority`: re-encode every block from now on.
    Rewrite,
    /// Nothing to fix (or not HTTP/2): forward everything raw.
    Passthrough,
}

/// Where the parser is in the byte stream.
#[derive(Clone, Copy)]
enum Phase {
    Preface,
    FrameHeader,
    /// Inside the payload of a frame we forward unparsed.
    Forward {
        remaining: usize,
    },
    /// Waiting for the whole payload of a HEADERS or CONTINUATION frame.
    HeaderPayload(FrameHead),
}

#[derive(Clone, Copy)]
struct FrameHead {
    raw: [u8; FRAME_HEADER_LEN],
    len: usize,
    kind: u8,
    flags: u8,
    stream_id: u32,
}

impl FrameHead {
    fn parse(bytes: &[u8]) -> Option<Self> {
        let raw: [u8; FRAME_HEADER_LEN] = bytes.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        Some(Self {
            raw,
            len: usize::from(raw[0]) << 16 | usize::from(raw[1]) << 8 | usize::from(raw[2]),
            kind: raw[3],
            flags: raw[4],
            // The top bit is reserved and must be ignored on receipt.
            stream_id: u32::from_be_bytes([raw[5], raw[6], raw[7], raw[8]]) & 0x7fff_ffff,
        })
    }
}

/// The header block being collected (HEADERS plus CONTINUATIONs).
struct OpenBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    continuations: usize,
}

/// Push parser from raw client bytes to the bytes handed to h2.
struct Parser {
    mode: Mode,
    phase: Phase,
    block: Option<OpenBlock>,
    /// HPACK fragment of the open block (padding and priority removed).
    fragment: Vec<u8>,
    /// Original frames of the open block, kept while inspecting so they can be forwarded as is.
    raw: Vec<u8>,
    /// Re-encoded block.
    encoded: Vec<u8>,
    /// The client's HPACK state; dropped once in passthrough.
    decoder: Option<Decoder<'static>>,
    /// Whether the first block may be judged by [`first_block::scan`] (tests compare both paths).
    fast_first_block: bool,
    limits: Limits,
    out: Vec<u8>,
    out_pos: usize,
}

impl Parser {
    fn new(limits: Limits) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        Self {
            mode: Mode::Inspect,
            phase: Phase::Preface,
            block: None,
            fragment: Vec::new(),
            raw: Vec::new(),
            encoded: Vec::new(),
            decoder: Some(decoder),
            fast_first_block: true,
            limits,
            out: Vec::new(),
            out_pos: 0,
        }
    }

    fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    #[allow(
        clippy::indexing_slicing,
        reason = "out_pos <= out.len() (it only advances by n), and n <= pending.len() is computed right above"
    )]
    fn take_output(&mut self, buf: &mut ReadBuf<'_>) {
        let pending = &self.out[self.out_pos..];
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        self.out_pos += n;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > KEEP_CAPACITY {
                self.out = Vec::new();
            }
        }
    }

    /// Whether the stream may end here without truncating anything.
    fn at_boundary(&self) -> bool {
        match self.phase {
            _ if self.mode == Mode::Passthrough => true,
            Phase::Preface => true,
            Phase::FrameHeader | Phase::Forward { remaining: 0 } => self.block.is_none(),
            Phase::Forward { .. } | Phase::HeaderPayload(_) => false,
        }
    }

    /// How many bytes may bypass the parser, if the next bytes need no parsing at all.
    fn direct_read_limit(&self) -> Option<usize> {
        match self.phase {
            _ if self.mode == Mode::Passthrough => Some(usize::MAX),
            Phase::Forward { remaining } if remaining > 0 => Some(remaining),
            _ => None,
        }
    }

    /// Accounts for `n` bytes that went straight to h2 (see [`Self::direct_read_limit`]).
    fn consumed_directly(&mut self, n: usize) {
        if let Phase::Forward { remaining } = self.phase {
            self.phase = Phase::Forward {
                remaining: remaining.saturating_sub(n),
            };
        }
    }

    /// Parses as much of `data` as possible, appending to the output. Returns how many bytes
    /// were consumed; the rest (an incomplete unit) must be offered again with more data.
    fn feed(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut pos = 0;
        loop {
            // pos only advances over bytes of `rest`, so this never fails.
            let rest = data
                .get(pos..)
                .ok_or_else(|| invalid_data("HTTP/2 parser position past its input"))?;
            if self.mode == Mode::Passthrough {
                self.out.extend_from_slice(rest);
                return Ok(data.len());
            }
            match self.phase {
                Phase::Preface => {
                    let n = rest.len().min(PREFACE.len());
                    // Compares the first n bytes (zip stops at the shorter side).
                    if rest.iter().zip(PREFACE).any(|(got, want)| got != want) {
                        // Not HTTP/2 with prior knowledge: not ours to touch.
                        self.enter_passthrough();
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(pos);
                    }
                    self.out.extend_from_slice(PREFACE);
                    pos += PREFACE.len();
                    self.phase = Phase::FrameHeader;
                }
                Phase::FrameHeader => {
                    let Some(head) = FrameHead::parse(rest) else {
                        return Ok(pos);
                    };
                    pos += FRAME_HEADER_LEN;
                    self.on_frame_head(head)?;
                }
                Phase::Forward { remaining } => {
                    if remaining == 0 {
                        self.phase = Phase::FrameHeader;
                        continue;
                    }
                    // At most `remaining` bytes: all of `rest` if it is shorter.
                    let chunk = rest.get(..remaining).unwrap_or(rest);
                    let n = chunk.len();
                    if n == 0 {
                        return Ok(pos);
                    }
                    self.out.extend_from_slice(chunk);
                    pos += n;
                    self.phase = Phase::Forward {
                        remaining: remaining - n,
                    };
                }
                Phase::HeaderPayload(head) => {
                    let Some(payload) = rest.get(..head.len) else {
                        return Ok(pos);
                    };
                    self.on_header_frame(head, payload)?;
                    pos += head.len;
                    self.phase = Phase::FrameHeader;
                }
            }
        }
    }

    fn enter_passthrough(&mut self) {
        self.mode = Mode::Passthrough;
        self.decoder = None;
        self.fragment = Vec::new();
        self.raw = Vec::new();
        self.encoded = Vec::new();
    }

    fn on_frame_head(&mut self, head: FrameHead) -> io::Result<()> {
        let is_continuation = head.kind == TYPE_CONTINUATION;
        if let Some(block) = &mut self.block {
            // A header block must be contiguous (RFC 9113, section 4.3); h2 treats anything
            // else as a connection error, and so do we since we hold the block back.
            if !is_continuation || head.stream_id != block.stream_id {
                return Err(invalid_data(
                    "HTTP/2 frame other than CONTINUATION inside a header block",
                ));
            }
            block.continuations += 1;
            if block.continuations > MAX_CONTINUATIONS {
                return Err(invalid_data(
                    "too many CONTINUATION frames in a header block",
                ));
            }
        }
        let collect = head.kind == TYPE_HEADERS || (is_continuation && self.block.is_some());
        if collect {
            let block_len = if self.block.is_some() {
                self.fragment.len()
            } else {
                0
            };
            if block_len.saturating_add(head.len) > self.limits.max_block_bytes {
                return Err(invalid_data("HTTP/2 header block too large"));
            }
            self.phase = Phase::HeaderPayload(head);
        } else {
            // A stray CONTINUATION also lands here: h2 reports it properly.
            self.out.extend_from_slice(&head.raw);
            self.phase = Phase::Forward {
                remaining: head.len,
            };
        }
        Ok(())
    }

    fn on_header_frame(&mut self, head: FrameHead, payload: &[u8]) -> io::Result<()> {
        if head.kind == TYPE_HEADERS {
            let mut body = payload;
            let mut pad_len = 0;
            if head.flags & FLAG_PADDED != 0 {
                let (&pad, rest) = body
                    .split_first()
                    .ok_or_else(|| invalid_data("PADDED HEADERS frame without pad length"))?;
                pad_len = usize::from(pad);
                body = rest;
            }
            let priority = if head.flags & FLAG_PRIORITY != 0 {
                let (prio, rest) = body
                    .split_at_checked(PRIORITY_LEN)
                    .ok_or_else(|| invalid_data("HEADERS frame too short for its priority"))?;
                body = rest;
                Some(<[u8; PRIORITY_LEN]>::try_from(prio).map_err(|_| invalid_data("priority"))?)
            } else {
                None
            };
            let fragment = body
                .len()
                .checked_sub(pad_len)
                .and_then(|len| body.get(..len))
                .ok_or_else(|| invalid_data("HEADERS padding longer than the frame"))?;
            self.fragment.clear();
            self.fragment.extend_from_slice(fragment);
            self.raw.clear();
            self.block = Some(OpenBlock {
                stream_id: head.stream_id,
                end_stream: head.flags & FLAG_END_STREAM != 0,
                priority,
                continuations: 0,
            });
        } else {
            self.fragment.extend_from_slice(payload);
        }
        if self.mode == Mode::Inspect {
            self.raw.extend_from_slice(&head.raw);
            self.raw.extend_from_slice(payload);
        }
        if head.flags & FLAG_END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    /// Decodes the complete block, then forwards it raw or re-encoded depending on the mode.
    fn finish_block(&mut self) -> io::Result<()> {
        if self.mode == Mode::Inspect
            && self.fast_first_block
            && first_block::scan(
                &self.fragment,
                self.limits.max_header_list_bytes,
                FIELD_OVERHEAD,
            ) == first_block::Verdict::Passthrough
        {
            // Same as the full path's passthrough below, without decoding the block.
            self.block = None;
            self.out.extend_from_slice(&self.raw);
            self.enter_passthrough();
            return Ok(());
        }
        let block = self
            .block
            .take()
            .ok_or_else(|| invalid_data("no open header block"))?;
        let decoder = self
            .decoder
            .as_mut()
            .ok_or_else(|| invalid_data("no HPACK decoder"))?;

        let encoded = &mut self.encoded;
        encoded.clear();
        let mut list_bytes = 0usize;
        let mut too_large = false;
        let mut bad_authority: Option<Vec<u8>> = None;
        let max_list_bytes = self.limits.max_header_list_bytes;
        decoder
            .decode_with_cb(&self.fragment, |name, value| {
                // The decoder can't be stopped from here, so once over the limit just stop
                // doing work; the error is raised after decoding.
                if too_large {
                    return;
                }
                list_bytes = list_bytes
                    .saturating_add(name.len())
                    .saturating_add(value.len())
                    .saturating_add(FIELD_OVERHEAD);
                if list_bytes > max_list_bytes {
                    too_large = true;
                    return;
                }
                // Judge exactly as h2 does, not by looking for a path-like value.
                let value: &[u8] =
                    if &name[..] == b":authority" && Authority::try_from(&value[..]).is_err() {
                        if bad_authority.is_none() {
                            bad_authority = Some(value.to_vec());
                        }
                        REPLACEMENT_AUTHORITY
                    } else {
                        &value
                    };
                put_literal(encoded, &name, value);
            })
            .map_err(|e| invalid_data(format!("HPACK decoding failed: {e}")))?;
        if too_large {
            return Err(invalid_data("HTTP/2 header list too large"));
        }

        if self.mode == Mode::Inspect {
            if let Some(authority) = bad_authority {
                tracing::debug!(
                    authority = %String::from_utf8_lossy(&authority),
                    "unparseable :authority; rewriting it to localhost on this connection"
                );
                self.mode = Mode::Rewrite;
                self.raw = Vec::new();
            } else {
                self.out.extend_from_slice(&self.raw);
                self.enter_passthrough();
                return Ok(());
            }
        }
        put_block_frames(&mut self.out, &block, &self.encoded);
        Ok(())
    }
}

/// Frames a re-encoded block from scratch: HEADERS (END_STREAM and PRIORITY kept, no padding)
/// then CONTINUATIONs, each payload at most [`MAX_OUT_FRAME`], END_HEADERS on the last.
fn put_block_frames(out: &mut Vec<u8>, block: &OpenBlock, encoded: &[u8]) {
    let prio_len = if block.priority.is_some() {
        PRIORITY_LEN
    } else {
        0
    };
    let (first, tail) = encoded.split_at(encoded.len().min(MAX_OUT_FRAME - prio_len));
    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if tail.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    put_frame_header(
        out,
        prio_len + first.len(),
        TYPE_HEADERS,
        flags,
        block.stream_id,
    );
    if let Some(priority) = &block.priority {
        out.extend_from_slice(priority);
    }
    out.extend_from_slice(first);
    let mut chunks = tail.chunks(MAX_OUT_FRAME).peekable();
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            FLAG_END_HEADERS
        } else {
            0
        };
        put_frame_header(out, chunk.len(), TYPE_CONTINUATION, flags, block.stream_id);
        out.extend_from_slice(chunk);
    }
}

/// `len` must fit in 24 bits; callers never exceed [`MAX_OUT_FRAME`].
fn put_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: u32) {
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// HPACK "literal header field without indexing, new name" (RFC 7541, section 6.2.2): neither
/// reads nor changes the receiver's dynamic table, so the adapter needs no encoder state.
fn put_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    put_string(out, name);
    put_string(out, value);
}

/// A non-Huffman HPACK string literal (RFC 7541, section 5.2).
fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    put_integer(out, s.len(), 7, 0x00);
    out.extend_from_slice(s);
}

/// An HPACK integer with an N-bit prefix (RFC 7541, section 5.1); `high_bits` fills the rest of
/// the first byte.
fn put_integer(out: &mut Vec<u8>, mut value: usize, prefix_bits: u8, high_bits: u8) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(high_bits | value as u8);
        return;
    }
    out.push(high_bits | max_prefix as u8);
    value -= max_prefix;
    while value >= 0x80 {
        out.push(0x80 | (value & 0x7f) as u8);
        value >>= 7;
    }
    out.push(value as u8);
}

fn invalid_data(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::VecDeque;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, HeaderName, HeaderValue};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const BAD: &str = "tmp%2Fx%2Fapi.sock";
    const GOOD: &str = "localhost";
    const TIMEOUT: Duration = Duration::from_secs(10);

    // ----- client side: hand-framed HTTP/2 and HPACK, independent of the code under test -----

    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len();
        assert!(len < 1 << 24);
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }

    /// Preface plus an empty SETTINGS frame.
    fn connection_start() -> Vec<u8> {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        frame(&mut out, 0x4, 0, 0, &[]);
        out
    }

    /// Frames `block` as HEADERS (optionally padded / with priority) plus CONTINUATIONs of
    /// `piece` bytes.
    fn header_frames(
        out: &mut Vec<u8>,
        stream: u32,
        block: &[u8],
        end_stream: bool,
        pad: Option<u8>,
        priority: bool,
        piece: usize,
    ) {
        let mut chunks: Vec<&[u8]> = block.chunks(piece).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let count = chunks.len();
        for (k, chunk) in chunks.into_iter().enumerate() {
            let end_headers = if k + 1 == count { 0x4 } else { 0 };
            if k > 0 {
                frame(out, 0x9, end_headers, stream, chunk);
                continue;
            }
            let mut flags = end_headers;
            let mut payload = Vec::new();
            if end_stream {
                flags |= 0x1;
            }
            if let Some(p) = pad {
                flags |= 0x8;
                payload.push(p);
            }
            if priority {
                flags |= 0x20;
                payload.extend_from_slice(&[0x80, 0, 0, 0, 200]);
            }
            payload.extend_from_slice(chunk);
            if let Some(p) = pad {
                payload.extend(std::iter::repeat_n(0u8, usize::from(p)));
            }
            frame(out, 0x1, flags, stream, &payload);
        }
    }

    fn hpack_int(out: &mut Vec<u8>, mut v: usize, prefix: u32, high: u8) {
        let max = (1usize << prefix) - 1;
        if v < max {
            out.push(high | v as u8);
            return;
        }
        out.push(high | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }

    fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
        hpack_int(out, s.len(), 7, 0);
        out.extend_from_slice(s);
    }

    /// A client HPACK encoder that models its dynamic table, so it can emit indexed references
    /// to entries it inserted before (and get evictions right).
    struct ClientHpack {
        table: VecDeque<(Vec<u8>, Vec<u8>)>,
        size: usize,
        max: usize,
    }

    impl ClientHpack {
        fn new() -> Self {
            Self {
                table: VecDeque::new(),
                size: 0,
                max: 4096,
            }
        }

        fn evict_to(&mut self, limit: usize) {
            while self.size > limit {
                let (n, v) = self.table.pop_back().expect("table size accounting");
                self.size -= n.len() + v.len() + 32;
            }
        }

        fn size_update(&mut self, out: &mut Vec<u8>, max: usize) {
            hpack_int(out, max, 5, 0x20);
            self.max = max;
            self.evict_to(max);
        }

        fn indexed(out: &mut Vec<u8>, index: usize) {
            hpack_int(out, index, 7, 0x80);
        }

        /// Indexed reference if (name, value) is in the dynamic table, else a literal with
        /// incremental indexing (static name index if given, else a new name).
        fn cached(
            &mut self,
            out: &mut Vec<u8>,
            static_name: Option<usize>,
            name: &[u8],
            value: &[u8],
        ) {
            if let Some(pos) = self.table.iter().position(|(n, v)| n == name && v == value) {
                Self::indexed(out, 62 + pos);
                return;
            }
            match static_name {
                Some(index) => hpack_int(out, index, 6, 0x40),
                None => {
                    out.push(0x40);
                    hpack_str(out, name);
                }
            }
            hpack_str(out, value);
            let size = name.len() + value.len() + 32;
            if size > self.max {
                self.table.clear();
                self.size = 0;
            } else {
                self.evict_to(self.max - size);
                self.table.push_front((name.to_vec(), value.to_vec()));
                self.size += size;
            }
        }

        fn literal(out: &mut Vec<u8>, first: u8, name: &[u8], value: &[u8]) {
            out.push(first);
            hpack_str(out, name);
            hpack_str(out, value);
        }
    }

    struct Expected {
        stream_id: u32,
        path: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    /// One request's header block, varied by `i`: static and dynamic indexed fields, literals
    /// with incremental indexing that force evictions, never-indexed and Huffman fields, size
    /// updates, and every 7th request a 40 KB header.
    fn request_block(
        hpack: &mut ClientHpack,
        authority: &str,
        i: usize,
    ) -> (Vec<u8>, String, Vec<(String, String)>) {
        let mut b = Vec::new();
        let mut headers = Vec::new();
        if i % 11 == 5 {
            hpack.size_update(&mut b, 256);
            hpack.size_update(&mut b, 4096);
        }
        ClientHpack::indexed(&mut b, 3); // :method POST
        ClientHpack::indexed(&mut b, 6); // :scheme http
        let path = format!("/svc.Service/Method{}", i % 7);
        hpack.cached(&mut b, Some(4), b":path", path.as_bytes());
        hpack.cached(&mut b, Some(1), b":authority", authority.as_bytes());
        let mut add =
            |hpack: &mut ClientHpack, b: &mut Vec<u8>, name: &str, value: String, how: u8| {
                match how {
                    0 => hpack.cached(b, None, name.as_bytes(), value.as_bytes()),
                    first => {
                        ClientHpack::literal(b, first & 0xf0, name.as_bytes(), value.as_bytes())
                    }
                }
                headers.push((name.to_string(), value));
            };
        add(hpack, &mut b, "content-type", "application/grpc".into(), 0);
        add(hpack, &mut b, "te", "trailers".into(), 0);
        add(
            hpack,
            &mut b,
            &format!("x-small-{}", i % 5),
            format!("s{}", i % 5),
            0,
        );
        let meta = format!("{}{}", "m".repeat((i * 37) % 300), i % 50);
        add(hpack, &mut b, &format!("x-meta-{}", i % 50), meta, 0);
        add(hpack, &mut b, "x-plain", i.to_string(), 0x01); // literal without indexing
        add(hpack, &mut b, "x-secret", format!("s{i}"), 0x10); // never indexed
        if i % 7 == 3 {
            let big = char::from(b'a' + (i % 26) as u8).to_string().repeat(40_000);
            add(hpack, &mut b, "x-big", big, 0x01);
        }
        if i.is_multiple_of(5) {
            // cache-control (static name 24): "no-cache" Huffman-coded (RFC 7541, C.4.2).
            b.extend_from_slice(&[0x0f, 0x09, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]);
            headers.push(("cache-control".into(), "no-cache".into()));
        }
        (b, path, headers)
    }

    /// `n` requests on one connection, framed with every PADDED x PRIORITY x split combination,
    /// padded DATA frames interleaved after the next request's headers, and PINGs.
    fn build_requests(authority: &str, n: usize) -> (Vec<u8>, Vec<Expected>) {
        let mut out = connection_start();
        let mut hpack = ClientHpack::new();
        let mut expected = Vec::new();
        let mut deferred_data: Option<Vec<u8>> = None;
        for i in 0..n {
            let stream_id = 2 * i as u32 + 1;
            let (block, path, headers) = request_block(&mut hpack, authority, i);
            let with_body = i % 3 == 0;
            let pad = (i % 2 == 1).then_some((i % 13) as u8);
            let priority = (i / 2) % 2 == 1;
            let piece = match (i / 4) % 3 {
                _ if block.len() > 2000 => 16_000,
                0 => 16_000,
                1 => block.len().div_ceil(2).max(1),
                _ => 37,
            };
            header_frames(
                &mut out, stream_id, &block, !with_body, pad, priority, piece,
            );
            if let Some(data) = deferred_data.take() {
                out.extend_from_slice(&data);
            }
            if i % 4 == 2 {
                frame(&mut out, 0x6, 0, 0, &(i as u64).to_be_bytes()); // PING
            }
            let mut body = Vec::new();
            if with_body {
                body = format!("body-{i}").into_bytes();
                let mut payload = vec![3];
                payload.extend_from_slice(&body);
                payload.extend_from_slice(&[0, 0, 0]);
                let mut data = Vec::new();
                frame(&mut data, 0x0, 0x1 | 0x8, stream_id, &payload);
                deferred_data = Some(data);
            }
            expected.push(Expected {
                stream_id,
                path,
                headers,
                body,
            });
        }
        if let Some(data) = deferred_data {
            out.extend_from_slice(&data);
        }
        (out, expected)
    }

    /// Splits `len` into irregular pieces so the adapter sees partial preface/headers/payloads.
    fn irregular_pieces(len: usize) -> Vec<std::ops::Range<usize>> {
        let mut state = 0x2545_f491u32;
        let mut pos = 0;
        let mut ranges = Vec::new();
        while pos < len {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let size = match state % 4 {
                0 => 1 + (state as usize >> 8) % 8,
                1 => 1 + (state as usize >> 8) % 200,
                _ => 1 + (state as usize >> 8) % 20_000,
            };
            let end = (pos + size).min(len);
            ranges.push(pos..end);
            pos = end;
        }
        ranges
    }

    // ----- harnesses -----

    /// Writes `input` into the adapter in irregular pieces and reads everything it yields with
    /// varying buffer sizes.
    async fn through_adapter(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut client, server_io) = tokio::io::duplex(8 * 1024);
        let writer = tokio::spawn(async move {
            for range in irregular_pieces(input.len()) {
                if client.write_all(&input[range]).await.is_err() {
                    return;
                }
            }
            let _ = client.shutdown().await;
        });
        let mut adapter = AuthorityFixingStream::new(server_io);
        let mut out = Vec::new();
        let mut buf = vec![0u8; 20_000];
        let sizes = [4096, 7, 20_000, 1, 333, 16_393];
        for k in 0.. {
            let size = sizes[k % sizes.len()];
            let n = tokio::time::timeout(TIMEOUT, adapter.read(&mut buf[..size]))
                .await
                .expect("adapter read timed out")?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        writer.await.expect("writer task");
        Ok(out)
    }

    struct Seen {
        stream_id: u32,
        method: http::Method,
        uri: http::Uri,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    /// Runs `client_bytes` through the adapter into a real `h2::server`. Returns the requests h2
    /// handed out (by stream id) and how the server connection ended.
    async fn serve_h2(client_bytes: Vec<u8>, expect: usize) -> (Vec<Seen>, Result<(), h2::Error>) {
        let (client, server_io) = tokio::io::duplex(64 * 1024);
        let (mut client_r, mut client_w) = tokio::io::split(client);
        // Drain whatever h2 sends (SETTINGS, PING acks, responses, WINDOW_UPDATEs).
        tokio::spawn(async move {
            let mut sink = vec![0u8; 16 * 1024];
            while matches!(client_r.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .max_header_list_size(1 << 20)
                .handshake::<_, Bytes>(AuthorityFixingStream::new(server_io))
                .await?;
            while let Some(accepted) = conn.accept().await {
                let (request, mut respond) = accepted?;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let stream_id = respond.stream_id().as_u32();
                    let (parts, mut body) = request.into_parts();
                    let mut data = Vec::new();
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        data.extend_from_slice(&chunk);
                    }
                    let _ = respond.send_response(http::Response::new(()), true);
                    let _ = tx.send(Seen {
                        stream_id,
                        method: parts.method,
                        uri: parts.uri,
                        headers: parts.headers,
                        body: data,
                    });
                });
            }
            Ok::<(), h2::Error>(())
        });
        let writer = tokio::spawn(async move {
            for range in irregular_pieces(client_bytes.len()) {
                if client_w.write_all(&client_bytes[range]).await.is_err() {
                    break;
                }
            }
            client_w
        });
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while seen.len() < expect {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => seen.push(s),
                _ => break,
            }
        }
        let mut client_w = writer.await.expect("writer task");
        let _ = client_w.shutdown().await;
        let result = tokio::time::timeout(TIMEOUT, server)
            .await
            .expect("h2 server did not finish")
            .expect("h2 server task panicked");
        seen.sort_by_key(|s| s.stream_id);
        (seen, result)
    }

    fn assert_requests(seen: &[Seen], expected: &[Expected], authority: &str) {
        assert_eq!(seen.len(), expected.len(), "number of requests h2 accepted");
        for (s, e) in seen.iter().zip(expected) {
            assert_eq!(s.stream_id, e.stream_id);
            assert_eq!(s.method, http::Method::POST, "stream {}", e.stream_id);
            assert_eq!(s.uri.scheme_str(), Some("http"));
            assert_eq!(s.uri.authority().map(|a| a.as_str()), Some(authority));
            assert_eq!(s.uri.path(), e.path);
            let mut headers = HeaderMap::new();
            for (n, v) in &e.headers {
                headers.append(
                    HeaderName::from_bytes(n.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                );
            }
            assert_eq!(s.headers, headers, "headers of stream {}", e.stream_id);
            assert_eq!(s.body, e.body, "body of stream {}", e.stream_id);
        }
    }

    fn assert_io_error(result: Result<(), h2::Error>, kind: io::ErrorKind) {
        let err = result.expect_err("h2 connection should fail");
        let io = err
            .get_io()
            .unwrap_or_else(|| panic!("not an io error: {err:?}"));
        assert_eq!(io.kind(), kind, "{io}");
    }

    struct Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    fn parse_frames(bytes: &[u8]) -> Vec<Frame> {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            frames.push(Frame {
                kind: rest[3],
                flags: rest[4],
                stream: u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]),
                payload: rest[9..9 + len].to_vec(),
            });
            rest = &rest[9 + len..];
        }
        frames
    }

    /// A header block from parsed frames: (stream, flags of the HEADERS frame, priority,
    /// fragment, frames used).
    struct Block {
        stream: u32,
        end_stream: bool,
        priority: Option<Vec<u8>>,
        padded: bool,
        fragment: Vec<u8>,
        frame_lens: Vec<usize>,
    }

    fn header_blocks(frames: &[Frame]) -> Vec<Block> {
        let mut blocks: Vec<Block> = Vec::new();
        let mut open = false;
        for f in frames {
            match f.kind {
                0x1 => {
                    assert!(!open);
                    let mut p = &f.payload[..];
                    let mut pad = 0;
                    if f.flags & 0x8 != 0 {
                        pad = usize::from(p[0]);
                        p = &p[1..];
                    }
                    let mut priority = None;
                    if f.flags & 0x20 != 0 {
                        priority = Some(p[..5].to_vec());
                        p = &p[5..];
                    }
                    blocks.push(Block {
                        stream: f.stream,
                        end_stream: f.flags & 0x1 != 0,
                        priority,
                        padded: f.flags & 0x8 != 0,
                        fragment: p[..p.len() - pad].to_vec(),
                        frame_lens: vec![f.payload.len()],
                    });
                    open = f.flags & 0x4 == 0;
                }
                0x9 => {
                    assert!(open);
                    let b = blocks.last_mut().expect("open block");
                    assert_eq!(b.stream, f.stream);
                    b.fragment.extend_from_slice(&f.payload);
                    b.frame_lens.push(f.payload.len());
                    open = f.flags & 0x4 == 0;
                }
                _ => assert!(!open, "frame inside a header block"),
            }
        }
        assert!(!open);
        blocks
    }

    /// Checks that a block consists only of "literal without indexing, new name" fields with
    /// non-Huffman strings, i.e. that it neither reads nor changes h2's dynamic table.
    fn assert_only_plain_literals(mut block: &[u8]) {
        fn take_str(block: &mut &[u8]) {
            assert_eq!(block[0] & 0x80, 0, "Huffman string in re-encoded block");
            let mut len = usize::from(block[0] & 0x7f);
            let mut used = 1;
            if len == 0x7f {
                let mut shift = 0;
                loop {
                    let b = block[used];
                    used += 1;
                    len += usize::from(b & 0x7f) << shift;
                    shift += 7;
                    if b & 0x80 == 0 {
                        break;
                    }
                }
            }
            *block = &block[used + len..];
        }
        while !block.is_empty() {
            assert_eq!(
                block[0], 0x00,
                "not a literal-without-indexing/new-name field"
            );
            block = &block[1..];
            take_str(&mut block);
            take_str(&mut block);
        }
    }

    fn decode_block(decoder: &mut Decoder<'static>, block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        decoder.decode(block).expect("valid HPACK")
    }

    // ----- tests against a real h2 server -----

    #[tokio::test]
    async fn bad_authority_becomes_localhost_with_headers_intact_across_requests() {
        let (bytes, expected) = build_requests(BAD, 300);
        let (seen, _) = serve_h2(bytes, expected.len()).await;
        // `localhost` on every request, every other header and body intact: the adapter's
        // decoder kept in step with the client's dynamic table through insertions, evictions
        // and size updates.
        assert_requests(&seen, &expected, "localhost");
    }

    #[tokio::test]
    async fn good_authority_requests_reach_h2_unchanged() {
        let (bytes, expected) = build_requests(GOOD, 300);
        let (seen, result) = serve_h2(bytes, expected.len()).await;
        assert_requests(&seen, &expected, GOOD);
        result.expect("clean shutdown");
    }

    #[tokio::test]
    async fn without_adapter_h2_rejects_bad_authority() {
        // Guards the premise: if h2 ever accepts such authorities, this adapter can go.
        let (bytes, _) = build_requests(BAD, 1);
        let (client, server_io) = tokio::io::duplex(64 * 1024);
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.expect("handshake");
            // h2 resets the stream itself and never hands the request out.
            let accepted = conn.accept().await;
            accepted.is_some()
        });
        client_w.write_all(&bytes).await.expect("write");
        let mut received = Vec::new();
        let mut buf = vec![0u8; 4096];
        let found_reset = tokio::time::timeout(TIMEOUT, async {
            loop {
                let n = client_r.read(&mut buf).await.expect("read");
                assert!(n > 0, "server closed without RST_STREAM");
                received.extend_from_slice(&buf[..n]);
                let mut rest = &received[..];
                while rest.len() >= 9 {
                    let len = usize::from(rest[0]) << 16
                        | usize::from(rest[1]) << 8
                        | usize::from(rest[2]);
                    if rest.len() < 9 + len {
                        break;
                    }
                    if rest[3] == 0x3 {
                        // RST_STREAM(PROTOCOL_ERROR) on stream 1
                        assert_eq!(&rest[5..9], &1u32.to_be_bytes());
                        assert_eq!(&rest[9..13], &1u32.to_be_bytes());
                        return true;
                    }
                    rest = &rest[9 + len..];
                }
            }
        })
        .await
        .expect("no RST_STREAM from h2");
        assert!(found_reset);
        drop(client_w);
        drop(client_r);
        let _ = tokio::time::timeout(TIMEOUT, server).await;
    }

    #[tokio::test]
    async fn truncated_header_block_is_an_io_error() {
        let mut bytes = connection_start();
        let mut block = Vec::new();
        ClientHpack::indexed(&mut block, 3);
        ClientHpack::literal(&mut block, 0x00, b":authority", BAD.as_bytes());
        // A literal announcing a 50-byte name but carrying 3 bytes.
        block.extend_from_slice(&[0x00, 50, b'a', b'b', b'c']);
        header_frames(&mut bytes, 1, &block, true, None, false, 16_000);
        let (seen, result) = serve_h2(bytes, 1).await;
        assert!(seen.is_empty());
        assert_io_error(result, io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn continuation_flood_is_refused() {
        fn flood(continuations: usize) -> Vec<u8> {
            let mut bytes = connection_start();
            let mut block = Vec::new();
            for index in [3, 6, 4] {
                ClientHpack::indexed(&mut block, index);
            }
            ClientHpack::literal(&mut block, 0x00, b":authority", BAD.as_bytes());
            frame(&mut bytes, 0x1, 0x1, 1, &block);
            for k in 0..continuations {
                let flags = if k + 1 == continuations { 0x4 } else { 0 };
                frame(&mut bytes, 0x9, flags, 1, &[]);
            }
            bytes
        }
        // At the limit: merged into one block that h2 accepts.
        let (seen, _) = serve_h2(flood(MAX_CONTINUATIONS), 1).await;
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].uri.authority().map(|a| a.as_str()),
            Some("localhost")
        );
        // One more: connection error before h2 sees anything of the block.
        let (seen, result) = serve_h2(flood(MAX_CONTINUATIONS + 1), 1).await;
        assert!(seen.is_empty());
        assert_io_error(result, io::ErrorKind::InvalidData);
    }

    // ----- byte-level tests of the adapter -----

    #[tokio::test]
    async fn good_first_authority_passes_bytes_through_untouched() {
        let (mut bytes, _) = build_requests(GOOD, 120);
        // A non-header frame with a large payload, and a later block with a bad authority:
        // FirstBlock mode decided on the first block, so it stays raw as well.
        frame(&mut bytes, 0x0, 0x1, 999, &vec![7u8; 16_000]);
        let mut block = Vec::new();
        ClientHpack::literal(&mut block, 0x00, b":authority", BAD.as_bytes());
        header_frames(&mut bytes, 1001, &block, true, Some(4), true, 16_000);
        let out = through_adapter(bytes.clone()).await.expect("adapter");
        assert!(out == bytes, "passthrough changed the bytes");
    }

    #[tokio::test]
    async fn non_http2_bytes_pass_through_untouched() {
        let bytes = b"GET / HTTP/1.1\r\nHost: tmp%2Fx%2Fapi.sock\r\n\r\n".repeat(100);
        let out = through_adapter(bytes.clone()).await.expect("adapter");
        assert_eq!(out, bytes);
    }

    #[tokio::test]
    async fn rewritten_blocks_are_table_free_and_reframed() {
        let (mut bytes, _) = build_requests(BAD, 120);
        frame(&mut bytes, 0x0, 0x1, 999, &vec![7u8; 16_000]);
        let out = through_adapter(bytes.clone()).await.expect("adapter");

        let in_frames = parse_frames(&bytes);
        let out_frames = parse_frames(&out);
        // Every other frame is forwarded as is and in order.
        let others = |frames: &[Frame]| -> Vec<(u8, u8, u32, Vec<u8>)> {
            frames
                .iter()
                .filter(|f| f.kind != 0x1 && f.kind != 0x9)
                .map(|f| (f.kind, f.flags, f.stream, f.payload.clone()))
                .collect()
        };
        assert!(others(&in_frames) == others(&out_frames));

        let in_blocks = header_blocks(&in_frames);
        let out_blocks = header_blocks(&out_frames);
        assert_eq!(in_blocks.len(), out_blocks.len());
        let mut client_decoder = Decoder::new();
        let mut saw_split = false;
        for (i, o) in in_blocks.iter().zip(&out_blocks) {
            assert_eq!(o.stream, i.stream);
            assert_eq!(o.end_stream, i.end_stream);
            assert_eq!(o.priority, i.priority);
            assert!(!o.padded);
            assert!(o.frame_lens.iter().all(|&len| len <= 16_384));
            // Only the last frame may be short: frames are re-split, not the client's.
            let (last, full) = o.frame_lens.split_last().expect("frame");
            let prio = if o.priority.is_some() { 5 } else { 0 };
            assert!(full.iter().all(|&len| len == 16_384));
            assert!(*last <= 16_384 && (*last > prio || o.fragment.is_empty()));
            saw_split |= o.frame_lens.len() > 1;
            assert_only_plain_literals(&o.fragment);
            // A fresh decoder per output block: it must not depend on any table state.
            let got = decode_block(&mut Decoder::new(), &o.fragment);
            let want: Vec<_> = decode_block(&mut client_decoder, &i.fragment)
                .into_iter()
                .map(|(n, v)| {
                    if n == b":authority" {
                        (n, b"localhost".to_vec())
                    } else {
                        (n, v)
                    }
                })
                .collect();
            assert!(got == want, "stream {}", i.stream);
        }
        assert!(saw_split, "no block needed CONTINUATIONs");
    }

    // ----- protections (parser fed directly; fast and deterministic) -----

    fn feed_all(bytes: &[u8]) -> io::Result<Vec<u8>> {
        let mut parser = Parser::new(Limits::default());
        let used = parser.feed(bytes)?;
        assert_eq!(used, bytes.len(), "input left unparsed");
        Ok(std::mem::take(&mut parser.out))
    }

    fn bad_first_block() -> Vec<u8> {
        let mut bytes = connection_start();
        let mut block = Vec::new();
        for index in [3, 6, 4] {
            ClientHpack::indexed(&mut block, index);
        }
        ClientHpack::literal(&mut block, 0x00, b":authority", BAD.as_bytes());
        header_frames(&mut bytes, 1, &block, true, None, false, 16_000);
        bytes
    }

    fn assert_invalid(result: io::Result<Vec<u8>>, what: &str) {
        let err = result.expect_err("should be refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(what), "{err}");
    }

    #[test]
    fn garbage_header_block_is_an_io_error() {
        // After the switch to rewriting: an index far beyond both tables.
        let mut bytes = bad_first_block();
        header_frames(
            &mut bytes,
            3,
            &[0xff, 0xff, 0xff, 0x0f],
            true,
            None,
            false,
            16_000,
        );
        assert_invalid(feed_all(&bytes), "HPACK");
        // In the first block: a table size update above the 4096 cap.
        let mut bytes = connection_start();
        let mut block = Vec::new();
        hpack_int(&mut block, 8192, 5, 0x20);
        ClientHpack::indexed(&mut block, 2);
        header_frames(&mut bytes, 1, &block, true, None, false, 16_000);
        assert_invalid(feed_all(&bytes), "HPACK");
    }

    #[test]
    fn header_block_over_1_mib_is_refused() {
        let mut bytes = bad_first_block();
        let chunk = vec![0u8; 16_384];
        frame(&mut bytes, 0x1, 0, 3, &chunk);
        for k in 0..64 {
            frame(&mut bytes, 0x9, if k == 63 { 0x4 } else { 0 }, 3, &chunk);
        }
        assert_invalid(feed_all(&bytes), "header block too large");
    }

    #[test]
    fn a_server_with_a_small_header_list_holds_the_adapter_to_it() {
        let limits = Limits::for_header_list(16 * 1024);
        // The first block, unfinished, reaching past 16 KiB: refused at the frame head that
        // crosses, before its payload is read (so the adapter never holds more).
        let mut bytes = connection_start();
        let chunk = vec![0u8; 16_000];
        frame(&mut bytes, 0x1, 0, 1, &chunk);
        let crossing = bytes.len();
        frame(&mut bytes, 0x9, 0, 1, &chunk);
        let mut parser = Parser::new(limits);
        let err = parser
            .feed(&bytes[..crossing + FRAME_HEADER_LEN])
            .expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("header block too large"), "{err}");
        // A whole block within the limit still passes, and a list past it is refused.
        let mut ok = connection_start();
        let mut block = Vec::new();
        ClientHpack::literal(&mut block, 0x00, b":authority", BAD.as_bytes());
        ClientHpack::literal(&mut block, 0x00, b"x-big", &[b'v'; 12_000]);
        header_frames(&mut ok, 1, &block, true, None, false, 16_000);
        let mut parser = Parser::new(limits);
        assert_eq!(parser.feed(&ok).unwrap(), ok.len());
        let mut big = connection_start();
        let mut block = Vec::new();
        ClientHpack::literal(&mut block, 0x00, b":authority", BAD.as_bytes());
        let mut hpack = ClientHpack::new();
        hpack.cached(&mut block, None, b"x-big", &[b'v'; 3000]);
        for _ in 0..5 {
            hpack.cached(&mut block, None, b"x-big", &[b'v'; 3000]);
        }
        header_frames(&mut big, 1, &block, true, None, false, 16_000);
        let err = Parser::new(limits).feed(&big).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("header list too large"), "{err}");
    }

    #[test]
    fn decoded_header_list_over_16_mib_is_refused() {
        // ~8 KB of HPACK: a 4 KB entry inserted once, then referenced 4,200 times (~17 MB).
        let mut bytes = connection_start();
        let mut block = Vec::new();
        ClientHpack::literal(&mut block, 0x00, b":authority", BAD.as_bytes());
        let mut hpack = ClientHpack::new();
        hpack.cached(&mut block, None, b"x-huge", &[b'h'; 4000]);
        for _ in 0..4200 {
            hpack.cached(&mut block, None, b"x-huge", &[b'h'; 4000]);
        }
        header_frames(&mut bytes, 1, &block, true, None, false, 16_000);
        assert_invalid(feed_all(&bytes), "header list too large");
    }

    #[test]
    fn frames_inside_an_open_block_are_refused() {
        let mut block = Vec::new();
        ClientHpack::literal(&mut block, 0x00, b":authority", BAD.as_bytes());
        // A PING between HEADERS and its CONTINUATION.
        let mut bytes = connection_start();
        frame(&mut bytes, 0x1, 0x1, 1, &block[..4]);
        frame(&mut bytes, 0x6, 0, 0, &[0; 8]);
        assert_invalid(feed_all(&bytes), "inside a header block");
        // A CONTINUATION for another stream.
        let mut bytes = connection_start();
        frame(&mut bytes, 0x1, 0x1, 1, &block[..4]);
        frame(&mut bytes, 0x9, 0x4, 3, &block[4..]);
        assert_invalid(feed_all(&bytes), "inside a header block");
    }

    #[test]
    fn malformed_headers_frames_are_refused() {
        let mut bytes = connection_start();
        frame(&mut bytes, 0x1, 0x4 | 0x8, 1, &[200, 0x82]); // padding longer than the frame
        assert_invalid(feed_all(&bytes), "padding");
        let mut bytes = connection_start();
        frame(&mut bytes, 0x1, 0x4 | 0x8, 1, &[]); // PADDED without pad length
        assert_invalid(feed_all(&bytes), "pad length");
        let mut bytes = connection_start();
        frame(&mut bytes, 0x1, 0x4 | 0x20, 1, &[0, 0, 0]); // PRIORITY without its 5 bytes
        assert_invalid(feed_all(&bytes), "priority");
    }

    #[tokio::test]
    async fn eof_inside_a_header_block_is_an_io_error() {
        let mut bytes = connection_start();
        frame(&mut bytes, 0x1, 0x1, 1, &[0x82, 0x86]); // no END_HEADERS
        let err = through_adapter(bytes).await.expect_err("truncated");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // Cut inside a frame header.
        let mut bytes = connection_start();
        bytes.extend_from_slice(&[0, 0, 4, 1]);
        let err = through_adapter(bytes).await.expect_err("truncated");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn random_and_truncated_blocks_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut hpack = ClientHpack::new();
        let valid: Vec<Vec<u8>> = (0..20)
            .map(|i| request_block(&mut hpack, BAD, i).0)
            .collect();
        let (mut errors, mut oks) = (0, 0);
        for round in 0..4000 {
            let block: Vec<u8> = if round % 2 == 0 {
                let len = (next() % 64) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                let source = &valid[(next() % valid.len() as u64) as usize];
                let mut b = source[..(next() % source.len() as u64) as usize].to_vec();
                if round % 3 == 0 && !b.is_empty() {
                    let at = (next() % b.len() as u64) as usize;
                    b[at] = next() as u8;
                }
                b
            };
            // Odd rounds hit the decoder in inspect mode, even ones after the switch.
            let mut bytes = if round % 4 < 2 {
                bad_first_block()
            } else {
                connection_start()
            };
            header_frames(&mut bytes, 101, &block, true, None, false, 16_000);
            match feed_all(&bytes) {
                Ok(_) => oks += 1,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                    errors += 1;
                }
            }
        }
        assert!(errors > 100 && oks > 100, "errors {errors}, oks {oks}");
    }

    // ----- first-block fast path: must agree with the full decoder -----

    /// Huffman encodings (RFC 7541, Appendix B) of the strings the tests use; each is checked
    /// against loona's decoder before use.
    fn huffman(s: &[u8]) -> Vec<u8> {
        let encoded: &[u8] = match s {
            b"localhost" => b"\xa0\xe4\x1d\x13\x9d\x09",
            b"tmp%2Fx%2Fapi.sock" => b"\x4d\x35\xaa\x2c\x3e\x55\x16\x11\xd6\x65\xd0\x72\x75",
            b":authority" => b"\xb8\x3b\x53\x39\xec\x32\x7d\x7f",
            b"/spiffe.workload.SpiffeWorkloadAPI/FetchX509SVID" => b"\x61\x15\x9a\x59\x4a\xbf\x83\xd9\xd6\x83\x8e\x45\xf7\x56\x69\x65\x2f\x23\xd9\xd6\x83\x8e\x48\x75\xe4\x63\x09\x52\x49\xff\x1b\x03\xfb\xb8\xe4\xbf",
            b"grpc-python/1.60.0 grpc-c/37.0.0 (linux; chttp2)" => b"\x9a\xca\xc8\xb5\x7e\x93\x39\xea\x60\x2b\xb8\x05\xc0\xa4\xd6\x56\x45\x88\xc3\x2e\xae\x05\xc0\xa7\xf5\x41\xaa\xb7\xcf\xda\x84\x9d\x29\xac\x5f\xdf",
            b"identity,deflate,gzip" => b"\x34\x85\xa9\x26\x4f\xaf\xa9\x0b\x2d\x03\x49\x7e\xa6\xf6\x6a\xff",
            b"workload.spiffe.io" => b"\xf0\x7b\x3a\xd0\x71\xc8\xba\x2b\x34\xb2\x95\x73\x1f",
            b"true" => b"\x4d\x96\x97",
            b"trailers" => b"\x4d\x83\x35\x05\xb1\x1f",
            b"application/grpc" => b"\x1d\x75\xd0\x62\x0d\x26\x3d\x4c\x4d\x65\x64",
            other => panic!("no Huffman encoding for {other:?}"),
        };
        let decoded = loona_hpack::huffman::HuffmanDecoder::new()
            .decode(encoded)
            .expect("valid Huffman");
        assert_eq!(decoded, s);
        encoded.to_vec()
    }

    /// A Huffman string literal.
    fn huffman_str(out: &mut Vec<u8>, s: &[u8]) {
        let encoded = huffman(s);
        hpack_int(out, encoded.len(), 7, 0x80);
        out.extend_from_slice(&encoded);
    }

    /// The first block a grpc-core client (py-spiffe) sends, with `authority` Huffman-coded.
    fn grpc_core_block(authority: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        ClientHpack::indexed(&mut b, 3); // :method POST
        ClientHpack::indexed(&mut b, 6); // :scheme http
        hpack_int(&mut b, 4, 6, 0x40); // :path, incremental indexing
        huffman_str(&mut b, b"/spiffe.workload.SpiffeWorkloadAPI/FetchX509SVID");
        hpack_int(&mut b, 1, 6, 0x40); // :authority
        huffman_str(&mut b, authority);
        b.push(0x40);
        hpack_str(&mut b, b"grpc-accept-encoding");
        huffman_str(&mut b, b"identity,deflate,gzip");
        hpack_int(&mut b, 58, 6, 0x40); // user-agent
        huffman_str(&mut b, b"grpc-python/1.60.0 grpc-c/37.0.0 (linux; chttp2)");
        b.push(0x40);
        huffman_str(&mut b, b"workload.spiffe.io");
        huffman_str(&mut b, b"true");
        hpack_int(&mut b, 31, 6, 0x40); // content-type
        huffman_str(&mut b, b"application/grpc");
        b.push(0x40);
        hpack_str(&mut b, b"te");
        huffman_str(&mut b, b"trailers");
        b
    }

    /// Runs `first_block` (then a bad-authority second block and a DATA frame, so passthrough
    /// and rewriting give different bytes) through a parser with the fast path on or off.
    fn run_first_block(first_block: &[u8], fast: bool) -> Result<(Vec<u8>, Mode), String> {
        let bytes = run_raw_input(first_block);
        let mut parser = Parser::new(Limits::default());
        parser.fast_first_block = fast;
        match parser.feed(&bytes) {
            Ok(used) => {
                assert_eq!(used, bytes.len(), "input left unparsed");
                Ok((std::mem::take(&mut parser.out), parser.mode))
            }
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                Err(e.to_string())
            }
        }
    }

    /// Asserts the scanner's verdict on `block` and that both paths give identical results;
    /// returns that result.
    fn assert_paths_agree(
        block: &[u8],
        verdict: first_block::Verdict,
    ) -> Result<(Vec<u8>, Mode), String> {
        assert_eq!(
            first_block::scan(block, MAX_HEADER_LIST_BYTES, FIELD_OVERHEAD),
            verdict,
            "scanner verdict"
        );
        let fast = run_first_block(block, true);
        let slow = run_first_block(block, false);
        assert!(fast == slow, "fast {fast:?} vs slow {slow:?}");
        fast
    }

    fn assert_mode(result: Result<(Vec<u8>, Mode), String>, mode: Mode) {
        assert_eq!(result.expect("accepted").1, mode);
    }

    fn with_common_fields(build: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = Vec::new();
        ClientHpack::indexed(&mut b, 3);
        ClientHpack::indexed(&mut b, 6);
        ClientHpack::literal(&mut b, 0x00, b"x-before", b"1");
        build(&mut b);
        hpack_int(&mut b, 4, 4, 0x00); // :path, without indexing, static name
        hpack_str(&mut b, b"/svc/Method");
        b
    }

    #[test]
    fn fast_path_agrees_on_passthrough() {
        use first_block::Verdict::Passthrough;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("plain authority, static name, incremental indexing", {
                with_common_fields(|b| {
                    hpack_int(b, 1, 6, 0x40);
                    hpack_str(b, GOOD.as_bytes());
                })
            }),
            (
                "Huffman authority (grpc-core block)",
                grpc_core_block(GOOD.as_bytes()),
            ),
            ("static name, without indexing and never indexed", {
                with_common_fields(|b| {
                    hpack_int(b, 1, 4, 0x00);
                    hpack_str(b, b"example.com:443");
                    hpack_int(b, 1, 4, 0x10);
                    huffman_str(b, b"localhost");
                })
            }),
            ("literal name :authority", {
                with_common_fields(|b| {
                    ClientHpack::literal(b, 0x00, b":authority", GOOD.as_bytes());
                })
            }),
            ("Huffman literal name :authority", {
                with_common_fields(|b| {
                    b.push(0x10);
                    huffman_str(b, b":authority");
                    huffman_str(b, b"localhost");
                })
            }),
            ("absent authority", with_common_fields(|_| {})),
            ("empty block", Vec::new()),
            ("a name that only looks like :authority", {
                with_common_fields(|b| {
                    ClientHpack::literal(b, 0x40, b":authorit", BAD.as_bytes());
                    ClientHpack::literal(b, 0x00, b":authority ", BAD.as_bytes());
                })
            }),
        ];
        for (what, block) in cases {
            let result = assert_paths_agree(&block, Passthrough);
            let (out, mode) = result.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(mode, Mode::Passthrough, "{what}");
            // Passthrough: the output is the input, byte for byte.
            assert!(out == run_raw_input(&block), "{what}");
        }
    }

    /// The bytes `run_first_block` feeds, for comparing with a passthrough output.
    fn run_raw_input(first_block: &[u8]) -> Vec<u8> {
        let mut bytes = connection_start();
        // Small blocks split into 7-byte CONTINUATIONs, large ones within the flood limit.
        let piece = if first_block.len() > 1000 { 16_000 } else { 7 };
        header_frames(&mut bytes, 1, first_block, false, Some(3), true, piece);
        let mut second = Vec::new();
        ClientHpack::literal(&mut second, 0x00, b":authority", BAD.as_bytes());
        header_frames(&mut bytes, 3, &second, true, None, false, 16_000);
        frame(&mut bytes, 0x0, 0x1, 1, b"body");
        bytes
    }

    #[test]
    fn fast_path_defers_bad_authorities_to_the_rewrite() {
        use first_block::Verdict::SlowPath;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("plain percent-encoded socket path", {
                with_common_fields(|b| {
                    hpack_int(b, 1, 6, 0x40);
                    hpack_str(b, BAD.as_bytes());
                })
            }),
            ("Huffman percent-encoded socket path (grpc-core block)", {
                grpc_core_block(BAD.as_bytes())
            }),
            ("literal name :authority", {
                with_common_fields(|b| {
                    ClientHpack::literal(b, 0x10, b":authority", BAD.as_bytes());
                })
            }),
            ("Huffman literal name :authority", {
                with_common_fields(|b| {
                    b.push(0x00);
                    huffman_str(b, b":authority");
                    huffman_str(b, b"tmp%2Fx%2Fapi.sock");
                })
            }),
            ("indexed :authority (empty value)", {
                with_common_fields(|b| ClientHpack::indexed(b, 1))
            }),
            ("a good then a bad authority", {
                with_common_fields(|b| {
                    ClientHpack::literal(b, 0x00, b":authority", GOOD.as_bytes());
                    hpack_int(b, 1, 4, 0x00);
                    hpack_str(b, BAD.as_bytes());
                })
            }),
        ];
        for (what, block) in cases {
            let result = assert_paths_agree(&block, SlowPath);
            let (out, mode) = result.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(mode, Mode::Rewrite, "{what}");
            // Both blocks rewritten to table-free literals with `localhost`.
            let blocks = header_blocks(&parse_frames(&out));
            assert_eq!(blocks.len(), 2, "{what}");
            for block in &blocks {
                assert_only_plain_literals(&block.fragment);
                let fields = decode_block(&mut Decoder::new(), &block.fragment);
                assert!(
                    fields
                        .iter()
                        .all(|(n, v)| n != b":authority" || v == b"localhost"),
                    "{what}"
                );
            }
        }
    }

    #[test]
    fn fast_path_leaves_unusual_blocks_to_the_full_decoder() {
        use first_block::Verdict::SlowPath;
        // Accepted by the full decoder, but not vouched for by the scanner.
        let accepted: Vec<(&str, Vec<u8>)> = vec![
            ("size update, then a good authority", {
                let mut b = Vec::new();
                hpack_int(&mut b, 4096, 5, 0x20);
                ClientHpack::literal(&mut b, 0x00, b":authority", GOOD.as_bytes());
                b
            }),
            ("reference to an entry the block inserted", {
                let mut b = Vec::new();
                ClientHpack::literal(&mut b, 0x40, b"x-a", b"1");
                ClientHpack::indexed(&mut b, 62);
                hpack_int(&mut b, 62, 4, 0x00);
                hpack_str(&mut b, b"2");
                b
            }),
        ];
        for (what, block) in accepted {
            assert_mode(assert_paths_agree(&block, SlowPath), Mode::Passthrough);
            let _ = what;
        }
        // Size update then a bad authority: rewritten by both.
        let mut b = Vec::new();
        hpack_int(&mut b, 0, 5, 0x20);
        ClientHpack::literal(&mut b, 0x00, b":authority", BAD.as_bytes());
        assert_mode(assert_paths_agree(&b, SlowPath), Mode::Rewrite);

        // Refused by the full decoder: the same error either way.
        let refused: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "size update above 4096",
                {
                    let mut b = Vec::new();
                    hpack_int(&mut b, 8192, 5, 0x20);
                    ClientHpack::indexed(&mut b, 2);
                    b
                },
                "HPACK",
            ),
            (
                "size update at the end",
                {
                    let mut b = Vec::new();
                    ClientHpack::literal(&mut b, 0x00, b":authority", GOOD.as_bytes());
                    hpack_int(&mut b, 100, 5, 0x20);
                    b
                },
                "HPACK",
            ),
            (
                "truncated literal",
                {
                    let mut b = Vec::new();
                    ClientHpack::indexed(&mut b, 3);
                    ClientHpack::literal(&mut b, 0x00, b":authority", GOOD.as_bytes());
                    b.extend_from_slice(&[0x00, 50, b'a', b'b', b'c']);
                    b
                },
                "HPACK",
            ),
            ("truncated value length", vec![0x41, 0xff], "HPACK"),
            ("truncated index", vec![0xff, 0x80], "HPACK"),
            ("index 0", vec![0x80], "HPACK"),
            (
                "index past both tables",
                vec![0xff, 0xff, 0xff, 0x0f],
                "HPACK",
            ),
            (
                "literal name index past both tables",
                {
                    let mut b = Vec::new();
                    hpack_int(&mut b, 70, 4, 0x00);
                    hpack_str(&mut b, b"v");
                    b
                },
                "HPACK",
            ),
            (
                "invalid Huffman authority",
                {
                    let mut b = Vec::new();
                    hpack_int(&mut b, 1, 4, 0x00);
                    // 8 bits of EOS padding (at most 7 are allowed).
                    b.extend_from_slice(&[0x81, 0xff]);
                    b
                },
                "Huffman",
            ),
            (
                "header list over 16 MiB from static references",
                {
                    // 42 bytes of list per 1-byte field (:method GET): 420,000 fields is ~17 MB.
                    vec![0x82; 420_000]
                },
                "header list too large",
            ),
        ];
        for (what, block, error) in refused {
            let err = assert_paths_agree(&block, SlowPath).expect_err(what);
            assert!(err.contains(error), "{what}: {err}");
        }
    }

    #[test]
    fn fast_path_agrees_on_random_and_mutated_blocks() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let sources: Vec<Vec<u8>> = vec![
            grpc_core_block(GOOD.as_bytes()),
            grpc_core_block(BAD.as_bytes()),
            with_common_fields(|b| ClientHpack::literal(b, 0x00, b":authority", BAD.as_bytes())),
            with_common_fields(|b| ClientHpack::literal(b, 0x40, b":authority", GOOD.as_bytes())),
        ];
        let (mut fast_passthroughs, mut huffman_only_in_h2) = (0, 0);
        for round in 0..3000 {
            let block: Vec<u8> = if round % 3 == 0 {
                let len = (next() % 48) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                let source = &sources[(next() % sources.len() as u64) as usize];
                let mut b = source[..=(next() % source.len() as u64) as usize].to_vec();
                if round % 3 == 2 {
                    let at = (next() % b.len() as u64) as usize;
                    b[at] ^= 1 << (next() % 8);
                }
                b
            };
            let verdict = first_block::scan(&block, MAX_HEADER_LIST_BYTES, FIELD_OVERHEAD);
            let fast = run_first_block(&block, true);
            let slow = run_first_block(&block, false);
            if verdict == first_block::Verdict::SlowPath {
                assert!(fast == slow, "{block:02x?}");
                continue;
            }
            fast_passthroughs += 1;
            assert_eq!(fast.as_ref().map(|r| r.1), Ok(Mode::Passthrough));
            match &slow {
                Ok(_) => assert!(fast == slow, "{block:02x?}"),
                // The one accepted difference: a broken Huffman string in a field other than
                // :authority is left for h2 to report.
                Err(e) => {
                    assert!(e.contains("Huffman decoder error"), "{block:02x?}: {e}");
                    huffman_only_in_h2 += 1;
                }
            }
        }
        assert!(fast_passthroughs > 100, "{fast_passthroughs}");
        let _ = huffman_only_in_h2;
    }

    #[test]
    #[ignore = "timing, not a check: cargo test -p ztid-h2-authority --release -- --ignored --nocapture"]
    fn first_block_fast_vs_full_decode_timing() {
        let plain = with_common_fields(|b| {
            hpack_int(b, 1, 6, 0x40);
            hpack_str(b, GOOD.as_bytes());
        });
        for (what, block) in [
            (
                "grpc-core block, Huffman authority",
                grpc_core_block(GOOD.as_bytes()),
            ),
            ("plain authority", plain),
        ] {
            let mut bytes = connection_start();
            header_frames(&mut bytes, 1, &block, false, None, false, 16_000);
            time_first_blocks(what, &bytes);
        }
    }

    fn time_first_blocks(what: &str, bytes: &[u8]) {
        for fast in [false, true] {
            let start = std::time::Instant::now();
            for _ in 0..10_000 {
                let mut parser = Parser::new(Limits::default());
                parser.fast_first_block = fast;
                let used = parser.feed(bytes).expect("valid");
                assert_eq!(used, bytes.len());
                assert_eq!(parser.mode, Mode::Passthrough);
            }
            let per = start.elapsed() / 10_000;
            println!(
                "{what}, {}: {per:?} per connection start (preface, SETTINGS, first block)",
                if fast { "fast path" } else { "full decode" }
            );
        }
    }

    // ----- plumbing -----

    #[test]
    fn hpack_integers_follow_rfc_7541() {
        let enc = |v, prefix| {
            let mut out = Vec::new();
            put_integer(&mut out, v, prefix, 0);
            out
        };
        assert_eq!(enc(10, 5), [0x0a]); // C.1.1
        assert_eq!(enc(1337, 5), [0x1f, 0x9a, 0x0a]); // C.1.2
        assert_eq!(enc(42, 8), [0x2a]); // C.1.3
        assert_eq!(enc(127, 7), [0x7f, 0x00]);
        assert_eq!(enc(126, 7), [0x7e]);
    }

    #[tokio::test]
    async fn connect_info_and_writes_reach_the_inner_stream() {
        let (a, mut b) = tokio::net::UnixStream::pair().expect("socketpair");
        let mut wrapped = wrap_unix(a);
        let info = wrapped.connect_info();
        let cred = info.peer_cred.expect("peer credentials");
        assert_eq!(cred.pid(), Some(std::process::id() as i32));
        assert!(wrapped.get_ref().peer_cred().is_ok());

        let parts = [io::IoSlice::new(b"hello "), io::IoSlice::new(b"world")];
        let written = wrapped.write_vectored(&parts).await.expect("write");
        wrapped
            .write_all(&b"hello world"[written..])
            .await
            .expect("write");
        wrapped.flush().await.expect("flush");
        wrapped.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"hello world");
    }

    #[test]
    fn usable_with_tonic_serve_with_incoming() {
        fn assert_io<T: AsyncRead + AsyncWrite + Connected + Send + Sync + Unpin + 'static>() {}
        assert_io::<AuthorityFixingStream<tokio::net::UnixStream>>();
    }
}
