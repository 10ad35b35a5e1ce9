//! Integrity for a connection without TLS: every byte after the handshake
//! travels in a sealed record.
//!
//! The password handshake proves who is at each end, but on its own it
//! protects nothing that follows: a host on the path could inject a `run`
//! frame into a worker or forge a `task_done` to the master. [`MacStream`]
//! wraps the connection once the handshake is done. Each write becomes a
//! record `len: u32 BE ‖ payload ‖ tag`, where `tag` is
//! HMAC-SHA256(direction key, seq ‖ len ‖ payload) and `seq` counts the
//! records sent in that direction. A record that is altered, injected,
//! dropped, replayed or reordered fails its tag, and the reader returns an
//! error that names it, so the connection is closed. It sits below the
//! message framing, so file bodies (which cross outside frames) are covered
//! too. The payload is not encrypted: TLS is the way to keep it secret.
//!
//! Like a TLS stream, a `MacStream` must be flushed for what was written to
//! leave (`BufWriter`, which both ends use, flushes).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

type HmacSha256 = Hmac<Sha256>;

/// Largest payload in one record. Bigger writes are split.
pub const RECORD_MAX: usize = 64 * 1024;
const HEADER: usize = 4;
const TAG: usize = 32;

/// Which end of the connection this is: the two directions use different
/// keys, so a record cannot be reflected back to its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Master,
    Worker,
}

/// The keys of one connection, derived from the shared password and the
/// nonces both ends chose in the handshake (so every connection has its own
/// keys and a record of one cannot be replayed into another).
#[derive(Clone)]
pub struct SessionKeys {
    master_to_worker: HmacSha256,
    worker_to_master: HmacSha256,
}

impl SessionKeys {
    /// Derives the keys of a connection.
    ///
    /// ```
    /// # use drover_protocol::mac_stream::SessionKeys;
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
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length, so this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// A stream whose every record is authenticated; see the module docs.
pub struct MacStream<S> {
    inner: S,
    send_key: HmacSha256,
    recv_key: HmacSha256,
    send_seq: u64,
    recv_seq: u64,
    /// Sealed bytes not yet handed to `inner`, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    /// Raw bytes of the record being read.
    raw: Vec<u8>,
    /// Verified payload of the last record, served from `plain_pos`.
    plain: Vec<u8>,
    plain_pos: usize,
}

impl<S> MacStream<S> {
    /// Wraps `inner` for the given end of the connection.
    pub fn new(inner: S, keys: SessionKeys, end: End) -> MacStream<S> {
        let (send_key, recv_key) = match end {
            End::Master => (keys.master_to_worker, keys.worker_to_master),
            End::Worker => (keys.worker_to_master, keys.master_to_worker),
        };
        MacStream {
            inner,
            send_key,
            recv_key,
            send_seq: 0,
            recv_seq: 0,
            out: Vec::new(),
            out_pos: 0,
            raw: Vec::new(),
            plain: Vec::new(),
            plain_pos: 0,
        }
    }

    fn seal(&mut self, payload: &[u8]) {
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        let len = (payload.len() as u32).to_be_bytes();
        let mut mac = self.send_key.clone();
        mac.update(&self.send_seq.to_be_bytes());
        mac.update(&len);
        mac.update(payload);
        self.send_seq += 1;
        self.out.extend_from_slice(&len);
        self.out.extend_from_slice(payload);
        self.out.extend_from_slice(&mac.finalize().into_bytes());
    }

    /// Checks the record in `raw` and makes its payload readable.
    fn open(&mut self) -> io::Result<()> {
        let len = self.raw.len() - HEADER - TAG;
        let (head, rest) = self.raw.split_at(HEADER);
        let (payload, tag) = rest.split_at(len);
        let mut mac = self.recv_key.clone();
        mac.update(&self.recv_seq.to_be_bytes());
        mac.update(head);
        mac.update(payload);
        if mac.verify_slice(tag).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "record {} failed authentication: the connection was altered on the way \
                     (an injected, changed, replayed or reordered frame), or the peer does not \
                     hold this session's key",
                    self.recv_seq
                ),
            ));
        }
        self.recv_seq += 1;
        self.plain.clear();
        self.plain.extend_from_slice(payload);
        self.plain_pos = 0;
        self.raw.clear();
        Ok(())
    }
}

impl<S: AsyncWrite + Unpin> MacStream<S> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for MacStream<S> {
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

impl<S: AsyncRead + Unpin> AsyncRead for MacStream<S> {
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
            // How much of the record is still missing: its header first,
            // then (once its length is known) payload and tag.
            let want = if this.raw.len() < HEADER {
                HEADER
            } else {
                let mut len = [0u8; HEADER];
                len.copy_from_slice(&this.raw[..HEADER]);
                let len = u32::from_be_bytes(len) as usize;
                if len > RECORD_MAX {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "record {} announces {len} bytes, over the limit of {RECORD_MAX}: \
                             not a record of this session",
                            this.recv_seq
                        ),
                    )));
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> (MacStream<tokio::io::DuplexStream>, MacStream<tokio::io::DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let keys = SessionKeys::derive(b"pw", "m", "w");
        (
            MacStream::new(a, keys.clone(), End::Master),
            MacStream::new(b, keys, End::Worker),
        )
    }

    #[tokio::test]
    async fn bytes_cross_in_both_directions_in_any_size() {
        let (mut m, mut w) = pair();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            m.write_all(b"hello").await.unwrap();
            m.write_all(&sent).await.unwrap();
            m.flush().await.unwrap();
            let mut back = [0u8; 3];
            m.read_exact(&mut back).await.unwrap();
            back
        });
        let mut got = vec![0u8; 5 + big.len()];
        w.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..5], b"hello");
        assert_eq!(&got[5..], &big[..]);
        w.write_all(b"ack").await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(&writer.await.unwrap(), b"ack");
    }

    /// Sends `records` from a master end and returns the raw bytes on the wire.
    async fn wire(records: &[&[u8]]) -> Vec<u8> {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut m = MacStream::new(a, SessionKeys::derive(b"pw", "m", "w"), End::Master);
        for r in records {
            m.write_all(r).await.unwrap();
            m.flush().await.unwrap();
        }
        drop(m);
        let mut raw = Vec::new();
        b.read_to_end(&mut raw).await.unwrap();
        raw
    }

    /// What a worker end makes of `raw`.
    async fn read_as_worker(raw: Vec<u8>, password: &[u8]) -> io::Result<Vec<u8>> {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&raw).await?;
        drop(a);
        let mut w = MacStream::new(b, SessionKeys::derive(password, "m", "w"), End::Worker);
        let mut got = Vec::new();
        w.read_to_end(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn an_altered_byte_is_refused() {
        let mut raw = wire(&[b"{\"type\":\"run\"}"]).await;
        raw[6] ^= 1;
        let err = read_as_worker(raw, b"pw").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("failed authentication"), "{err}");
    }

    #[tokio::test]
    async fn an_injected_record_is_refused() {
        // The attacker seals its own record, but without the session key.
        let mut raw = wire(&[b"first"]).await;
        let forged = {
            let (a, mut b) = tokio::io::duplex(1 << 16);
            let mut m = MacStream::new(a, SessionKeys::derive(b"guess", "m", "w"), End::Master);
            m.write_all(b"{\"type\":\"run\"}").await.unwrap();
            m.flush().await.unwrap();
            drop(m);
            let mut v = Vec::new();
            b.read_to_end(&mut v).await.unwrap();
            v
        };
        raw.extend_from_slice(&forged);
        assert!(read_as_worker(raw, b"pw").await.is_err());
    }

    #[tokio::test]
    async fn replayed_or_reordered_records_are_refused() {
        let raw = wire(&[b"one", b"two"]).await;
        let rec = HEADER + 3 + TAG;
        let (one, two) = raw.split_at(rec);
        let replayed = [one, one].concat();
        assert!(read_as_worker(replayed, b"pw").await.is_err());
        let reordered = [two, one].concat();
        assert!(read_as_worker(reordered, b"pw").await.is_err());
        assert_eq!(read_as_worker(raw.clone(), b"pw").await.unwrap(), b"onetwo");
    }

    #[tokio::test]
    async fn a_record_reflected_to_its_sender_is_refused() {
        let raw = wire(&[b"hi"]).await;
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&raw).await.unwrap();
        drop(a);
        let mut m = MacStream::new(b, SessionKeys::derive(b"pw", "m", "w"), End::Master);
        let mut got = Vec::new();
        assert!(m.read_to_end(&mut got).await.is_err());
    }

    #[tokio::test]
    async fn a_huge_length_is_refused_without_allocating_it() {
        let raw = vec![0xff, 0xff, 0xff, 0xff, 0];
        let err = read_as_worker(raw, b"pw").await.unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
    }

    #[tokio::test]
    async fn a_truncated_record_is_an_unexpected_end() {
        let mut raw = wire(&[b"hello"]).await;
        raw.truncate(raw.len() - 1);
        let err = read_as_worker(raw, b"pw").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
