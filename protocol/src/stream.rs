//! One connection's byte streams, whatever protects them, so that the code
//! that reads and writes frames does not care.
//!
//! A connection starts as a [`Handshaking`] pair over plain TCP or over TLS
//! (TLS is set up first, so the password proof runs inside it). After the
//! password handshake, [`Handshaking::finish`] hands on a [`Reader`] and a
//! [`Writer`]:
//! - over TLS, the TLS streams themselves (TLS already authenticates and
//!   encrypts every byte);
//! - over plain TCP with a password, every write becomes a sealed record
//!   (see [`MacReader`]): an injected, altered, replayed or reordered frame
//!   fails its tag and the connection is closed;
//! - over plain TCP without a password, the socket as it is (the fast path:
//!   no record layer, no copy beyond the buffers every path has).
//!
//! The record layer sits below the frames, so file bodies, which cross
//! outside frames, are covered too. Each record is
//! `len: u32 BE ‖ payload ‖ tag`, where `tag` is HMAC-SHA256 under the
//! sending direction's key over `(seq, len, payload)` and `seq` counts the
//! records sent in that direction. The payload is not encrypted: TLS is the
//! way to keep it secret.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsStream;

type HmacSha256 = Hmac<Sha256>;

/// Largest payload in one record; bigger writes are split.
pub const RECORD_MAX: usize = 64 * 1024;
const HEADER: usize = 4;
const TAG: usize = 32;
/// Buffer size of each direction of a connection.
const BUFFER: usize = 64 * 1024;
/// Buffer size of each direction during the handshake, whose frames are
/// small: the buffers are zeroed when made, and a master that 1,000 workers
/// join at once made 4 x 64 KiB of them per worker (6-7% of its CPU in the
/// scale bench's 10,000-task corner). Under the connection's own buffers,
/// reads larger than this pass through it.
const HANDSHAKE_BUFFER: usize = 4 * 1024;

/// Which end of the connection this is: the two directions use different
/// keys, so a record cannot be reflected back to its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The master's end.
    Master,
    /// A worker's (or a status client's) end.
    Worker,
}

/// The record keys of one connection, derived from the shared password and
/// the nonces both ends chose in the handshake, so every connection has its
/// own keys and a record of one cannot be replayed into another.
#[derive(Clone)]
pub struct SessionKeys {
    master_to_worker: HmacSha256,
    worker_to_master: HmacSha256,
}

impl SessionKeys {
    /// Derives the keys of a connection.
    ///
    /// ```
    /// # use drover_protocol::stream::SessionKeys;
    /// let keys = SessionKeys::derive(b"secret", "master-nonce", "worker-nonce");
    /// ```
    pub fn derive(password: &[u8], master_nonce: &str, worker_nonce: &str) -> SessionKeys {
        let key = |label: &str| {
            let mut mac = keyed(password);
            mac.update(b"drover-records/1/");
            mac.update(label.as_bytes());
            mac.update(&(master_nonce.len() as u32).to_be_bytes());
            mac.update(master_nonce.as_bytes());
            mac.update(worker_nonce.as_bytes());
            keyed(&mac.finalize().into_bytes())
        };
        SessionKeys {
            master_to_worker: key("master-to-worker"),
            worker_to_master: key("worker-to-master"),
        }
    }

    /// (sending key, receiving key) of `end`.
    fn split(self, end: End) -> (HmacSha256, HmacSha256) {
        match end {
            End::Master => (self.master_to_worker, self.worker_to_master),
            End::Worker => (self.worker_to_master, self.master_to_worker),
        }
    }
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length, so this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// A record that failed its check: the connection was tampered with (or the
/// peer does not hold this session's keys). Carried inside an
/// [`io::Error`]; see [`is_auth_failure`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FrameAuthError(String);

fn auth_failure(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, FrameAuthError(text))
}

/// Whether `e` (or the I/O error inside a frame error) says a record failed
/// authentication, which the caller logs as an attack, not as a glitch.
pub fn is_auth_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<FrameAuthError>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            // Over TLS, a record that fails to decrypt is the same attack.
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<FrameAuthError>() || inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The reading half of a sealed connection: hands on only payload bytes
/// whose record checked out, in order.
pub struct MacReader<R> {
    inner: R,
    key: HmacSha256,
    seq: u64,
    /// Raw bytes of the record being read.
    raw: Vec<u8>,
    /// Verified payload of the last record, served from `plain_pos`.
    plain: Vec<u8>,
    plain_pos: usize,
}

impl<R> MacReader<R> {
    /// Reads `inner` as `end` of a connection with `keys`.
    pub fn new(inner: R, keys: SessionKeys, end: End) -> MacReader<R> {
        MacReader {
            inner,
            key: keys.split(end).1,
            seq: 0,
            raw: Vec::new(),
            plain: Vec::new(),
            plain_pos: 0,
        }
    }

    /// Checks the record in `raw` and makes its payload readable.
    fn open(&mut self) -> io::Result<()> {
        let len = self.raw.len() - HEADER - TAG;
        let (head, rest) = self.raw.split_at(HEADER);
        let (payload, tag) = rest.split_at(len);
        let mut mac = self.key.clone();
        mac.update(&self.seq.to_be_bytes());
        mac.update(head);
        mac.update(payload);
        if mac.verify_slice(tag).is_err() {
            return Err(auth_failure(format!(
                "record {} has a wrong tag: the connection was altered on the way (an injected, \
                 changed, replayed or reordered frame), or the peer does not hold this \
                 session's key",
                self.seq
            )));
        }
        self.seq += 1;
        std::mem::swap(&mut self.plain, &mut self.raw);
        // The payload sits between the header and the tag.
        self.plain.truncate(HEADER + len);
        self.plain_pos = HEADER;
        self.raw.clear();
        Ok(())
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for MacReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_pos);
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                return Poll::Ready(Ok(()));
            }
            // What of the record is still missing: its header first, then
            // (once its length is known) payload and tag.
            let want = if this.raw.len() < HEADER {
                HEADER
            } else {
                let mut len = [0u8; HEADER];
                len.copy_from_slice(&this.raw[..HEADER]);
                let len = u32::from_be_bytes(len) as usize;
                if len > RECORD_MAX {
                    return Poll::Ready(Err(auth_failure(format!(
                        "record {} announces {len} bytes, over the limit of {RECORD_MAX}: not a \
                         record of this session",
                        this.seq
                    ))));
                }
                HEADER + len + TAG
            };
            if this.raw.len() == want && want > HEADER {
                this.open()?;
                continue;
            }
            let have = this.raw.len();
            this.raw.resize(want, 0);
            let mut rb = ReadBuf::new(&mut this.raw[have..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
            let got = rb.filled().len();
            this.raw.truncate(have + got);
            ready!(polled)?;
            if got == 0 {
                return if have == 0 {
                    Poll::Ready(Ok(())) // end of stream between records
                } else {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of a record",
                    )))
                };
            }
        }
    }
}

/// The writing half of a sealed connection. Like a TLS stream, it must be
/// flushed for what was written to leave (the `BufWriter` over it is).
pub struct MacWriter<W> {
    inner: W,
    key: HmacSha256,
    seq: u64,
    /// Sealed bytes not yet handed to `inner`, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
}

impl<W> MacWriter<W> {
    /// Writes to `inner` as `end` of a connection with `keys`.
    pub fn new(inner: W, keys: SessionKeys, end: End) -> MacWriter<W> {
        MacWriter {
            inner,
            key: keys.split(end).0,
            seq: 0,
            out: Vec::new(),
            out_pos: 0,
        }
    }

    fn seal(&mut self, payload: &[u8]) {
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        let len = (payload.len() as u32).to_be_bytes();
        let mut mac = self.key.clone();
        mac.update(&self.seq.to_be_bytes());
        mac.update(&len);
        mac.update(payload);
        self.seq += 1;
        self.out.extend_from_slice(&len);
        self.out.extend_from_slice(payload);
        self.out.extend_from_slice(&mac.finalize().into_bytes());
    }
}

impl<W: AsyncWrite + Unpin> MacWriter<W> {
    /// Hands sealed bytes to `inner` until none are left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for MacWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // At most one record waits at a time, so a writer faster than the
        // peer is held back instead of buffering without bound.
        ready!(this.poll_drain(cx))?;
        let n = buf.len().min(RECORD_MAX);
        this.seal(&buf[..n]);
        // Start sending now; what does not go yet goes at the next write or
        // flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The socket's reading half, plain or TLS.
pub enum RawRead {
    /// Plain TCP.
    Tcp(OwnedReadHalf),
    /// TLS over TCP (either end).
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The socket's writing half, plain or TLS.
pub enum RawWrite {
    /// Plain TCP.
    Tcp(OwnedWriteHalf),
    /// TLS over TCP (either end).
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

/// What the frame code reads from after the handshake.
pub enum FrameReader {
    /// TLS, or plain TCP without a password.
    Plain(BufReader<RawRead>),
    /// Plain TCP with a password: sealed records.
    Mac(Box<MacReader<BufReader<RawRead>>>),
}

/// What the frame code writes to after the handshake.
pub enum FrameWriter {
    /// TLS, or plain TCP without a password.
    Plain(RawWrite),
    /// Plain TCP with a password: sealed records.
    Mac(Box<MacWriter<RawWrite>>),
}

/// A connection's buffered reader after the handshake.
pub type Reader = BufReader<FrameReader>;
/// A connection's buffered writer after the handshake.
pub type Writer = BufWriter<FrameWriter>;

/// Forwards the `AsyncRead`/`AsyncWrite` calls of an enum to its variants.
macro_rules! forward {
    ($self:ident, $inner:ident => $call:expr) => {
        match $self.get_mut() {
            Self::Plain($inner) => $call,
            Self::Mac($inner) => $call,
        }
    };
}

macro_rules! forward_raw {
    ($self:ident, $inner:ident => $call:expr) => {
        match $self.get_mut() {
            Self::Tcp($inner) => $call,
            Self::Tls($inner) => $call,
        }
    };
}

impl AsyncRead for RawRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        forward_raw!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for RawWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        forward_raw!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward_raw!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward_raw!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

impl AsyncRead for FrameReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for FrameWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        forward!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// A connection during its password handshake: buffered both ways, over
/// plain TCP or TLS. The handshake's frames are never sealed; what follows
/// is, from [`Handshaking::finish`] on.
pub struct Handshaking {
    /// Reads the handshake's frames.
    pub reader: BufReader<RawRead>,
    /// Writes the handshake's frames (flushed after each).
    pub writer: BufWriter<RawWrite>,
    binding: Option<[u8; 32]>,
}

impl Handshaking {
    /// A plain TCP connection.
    pub fn plain(stream: TcpStream) -> Handshaking {
        let (r, w) = stream.into_split();
        Handshaking {
            reader: BufReader::with_capacity(HANDSHAKE_BUFFER, RawRead::Tcp(r)),
            writer: BufWriter::with_capacity(HANDSHAKE_BUFFER, RawWrite::Tcp(w)),
            binding: None,
        }
    }

    /// A TLS connection whose TLS handshake is done.
    pub fn tls(stream: TlsStream<TcpStream>) -> Result<Handshaking, crate::tls::TlsError> {
        let binding = match &stream {
            TlsStream::Client(s) => crate::tls::binding(s.get_ref().1)?,
            TlsStream::Server(s) => crate::tls::binding(s.get_ref().1)?,
        };
        let (r, w) = tokio::io::split(stream);
        Ok(Handshaking {
            reader: BufReader::with_capacity(HANDSHAKE_BUFFER, RawRead::Tls(r)),
            writer: BufWriter::with_capacity(HANDSHAKE_BUFFER, RawWrite::Tls(w)),
            binding: Some(binding),
        })
    }

    /// The connecting side (a worker or a status client) on `stream`,
    /// which reached `addr` (`HOST:PORT`): over TLS when `tls` is given
    /// (the master's certificate must name HOST, or match the pinned
    /// fingerprint), else plain TCP.
    pub async fn connect(
        stream: TcpStream,
        addr: &str,
        tls: Option<&Arc<ClientConfig>>,
    ) -> Result<Handshaking, crate::tls::TlsError> {
        let Some(config) = tls else {
            return Ok(Handshaking::plain(stream));
        };
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let name = crate::tls::server_name(host)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(name, stream)
            .await
            .map_err(|e| crate::tls::TlsError::Handshake {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        Handshaking::tls(tls.into())
    }

    /// The TLS session's binding, to mix into the password proofs; `None`
    /// over plain TCP.
    pub fn binding(&self) -> Option<[u8; 32]> {
        self.binding
    }

    /// Ends the handshake as `end`. `keys` (the handshake's, when there was
    /// a password) seal every later byte over plain TCP; TLS needs none.
    pub fn finish(self, keys: Option<SessionKeys>, end: End) -> (Reader, Writer) {
        // The handshake flushed every frame it wrote, so nothing is lost
        // with the write buffer; the read buffer is kept, since the peer may
        // already have sent what follows the handshake.
        let raw_writer = self.writer.into_inner();
        let (reader, writer) = match keys {
            Some(keys) if self.binding.is_none() => (
                FrameReader::Mac(Box::new(MacReader::new(self.reader, keys.clone(), end))),
                FrameWriter::Mac(Box::new(MacWriter::new(raw_writer, keys, end))),
            ),
            _ => (
                FrameReader::Plain(self.reader),
                FrameWriter::Plain(raw_writer),
            ),
        };
        (
            BufReader::with_capacity(BUFFER, reader),
            BufWriter::with_capacity(BUFFER, writer),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn keys(password: &[u8]) -> SessionKeys {
        SessionKeys::derive(password, "m", "w")
    }

    #[tokio::test]
    async fn bytes_cross_in_both_directions_in_any_size() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let mut m_w = MacWriter::new(aw, keys(b"pw"), End::Master);
        let mut m_r = MacReader::new(ar, keys(b"pw"), End::Master);
        let mut w_w = MacWriter::new(bw, keys(b"pw"), End::Worker);
        let mut w_r = MacReader::new(br, keys(b"pw"), End::Worker);
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            m_w.write_all(b"hello").await.unwrap();
            m_w.write_all(&sent).await.unwrap();
            m_w.flush().await.unwrap();
            let mut back = [0u8; 3];
            m_r.read_exact(&mut back).await.unwrap();
            back
        });
        let mut got = vec![0u8; 5 + big.len()];
        w_r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..5], b"hello");
        assert_eq!(&got[5..], &big[..]);
        w_w.write_all(b"ack").await.unwrap();
        w_w.flush().await.unwrap();
        assert_eq!(&writer.await.unwrap(), b"ack");
    }

    /// Sends `records` from a master end with `password`'s keys and returns
    /// the raw bytes on the wire.
    async fn wire_with(records: &[&[u8]], password: &[u8]) -> Vec<u8> {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut m = MacWriter::new(a, keys(password), End::Master);
        for r in records {
            m.write_all(r).await.unwrap();
            m.flush().await.unwrap();
        }
        drop(m);
        let mut raw = Vec::new();
        b.read_to_end(&mut raw).await.unwrap();
        raw
    }

    async fn wire(records: &[&[u8]]) -> Vec<u8> {
        wire_with(records, b"pw").await
    }

    /// What `end` makes of `raw`.
    async fn read_as(raw: Vec<u8>, end: End) -> io::Result<Vec<u8>> {
        let (mut a, b): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 16);
        a.write_all(&raw).await?;
        drop(a);
        let mut r = MacReader::new(b, keys(b"pw"), end);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn an_altered_byte_is_refused_as_an_authentication_failure() {
        let mut raw = wire(&[b"{\"type\":\"run\"}"]).await;
        raw[6] ^= 1;
        let err = read_as(raw, End::Worker).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(is_auth_failure(&err), "{err}");
        assert!(err.to_string().contains("wrong tag"), "{err}");
    }

    #[tokio::test]
    async fn an_injected_record_is_refused() {
        // The attacker seals its own record, but without the session key.
        let mut raw = wire(&[b"first"]).await;
        raw.extend_from_slice(&wire_with(&[b"{\"type\":\"run\"}"], b"guess").await);
        let err = read_as(raw, End::Worker).await.unwrap_err();
        assert!(is_auth_failure(&err), "{err}");
    }

    #[tokio::test]
    async fn replayed_or_reordered_records_are_refused() {
        let raw = wire(&[b"one", b"two"]).await;
        let rec = HEADER + 3 + TAG;
        let (one, two) = raw.split_at(rec);
        assert!(read_as([one, one].concat(), End::Worker).await.is_err());
        assert!(read_as([two, one].concat(), End::Worker).await.is_err());
        assert_eq!(read_as(raw.clone(), End::Worker).await.unwrap(), b"onetwo");
    }

    #[tokio::test]
    async fn a_record_reflected_to_its_sender_is_refused() {
        let raw = wire(&[b"hi"]).await;
        assert!(read_as(raw, End::Master).await.is_err());
    }

    #[tokio::test]
    async fn a_huge_length_is_refused_without_allocating_it() {
        let err = read_as(vec![0xff, 0xff, 0xff, 0xff, 0], End::Worker)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
    }

    #[tokio::test]
    async fn a_truncated_record_is_an_unexpected_end() {
        let mut raw = wire(&[b"hello"]).await;
        raw.truncate(raw.len() - 1);
        let err = read_as(raw, End::Worker).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
