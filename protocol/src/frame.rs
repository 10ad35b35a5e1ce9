//! Frames: a `u32` big-endian length, then that many bytes of JSON.

use std::io;

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame either side accepts from an authenticated peer. Task
/// descriptions and reports are far smaller; file bodies are streamed
/// outside frames.
pub const MAX_FRAME_BYTES: u32 = 8 * 1024 * 1024;

/// Largest frame accepted before the peer is authenticated: the handshake's
/// messages are small, and an unknown peer must not choose how much memory
/// we hold for it.
pub const HANDSHAKE_FRAME_BYTES: u32 = 16 * 1024;

/// Errors while reading a frame.
#[derive(thiserror::Error, Debug)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {len} bytes is over the limit of {cap} bytes")]
    TooLarge { len: u32, cap: u32 },
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(transparent)]
    Io(io::Error),
}

/// Reads one frame of at most [`MAX_FRAME_BYTES`] and decodes it. `buf` is
/// reused across calls to avoid an allocation per frame.
pub async fn read_frame<R, T>(reader: &mut R, buf: &mut Vec<u8>) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_within(reader, buf, MAX_FRAME_BYTES).await
}

/// Reads one frame of at most `cap` bytes and decodes it. A longer frame is
/// refused from its length prefix alone, before anything is allocated for
/// it; a shorter one is read as its bytes arrive, so a peer that declares a
/// large frame and stalls holds only what it actually sent.
pub async fn read_frame_within<R, T>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: u32,
) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_body(reader, buf, cap).await?;
    Ok(serde_json::from_slice(buf)?)
}

/// Reads one frame's body (at most `cap` bytes) into `buf`, undecoded, for
/// a reader with its own decoder; the same rules as [`read_frame_within`].
pub async fn read_frame_body<R>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: u32,
) -> Result<(), FrameError>
where
    R: AsyncRead + Unpin,
{
    let len = match reader.read_u32().await {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Io(e)),
    };
    if len > cap {
        return Err(FrameError::TooLarge { len, cap });
    }
    buf.clear();
    let got = (&mut *reader)
        .take(u64::from(len))
        .read_to_end(buf)
        .await
        .map_err(FrameError::Io)?;
    if got < len as usize {
        return Err(FrameError::Closed);
    }
    Ok(())
}

/// Encodes `msg` as a frame and appends it to `out` (no I/O, so callers can batch frames).
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> io::Result<()> {
    encode_frame_with(out, |out| {
        serde_json::to_writer(out, msg).map_err(io::Error::other)
    })
}

/// Appends a frame whose body `body` writes (a hand-written encoder of a
/// hot message; it must write what serde would) to `out`.
pub fn encode_frame_with(
    out: &mut Vec<u8>,
    body: impl FnOnce(&mut Vec<u8>) -> io::Result<()>,
) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out)?;
    let len = out.len() - start - 4;
    let len = u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME_BYTES)
        .ok_or_else(|| {
            io::Error::other(format!("message of {len} bytes is over the frame limit"))
        })?;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Encodes `msg` into `buf` (cleared first, reused across calls) and writes
/// it as one frame (not flushed): a writer's loop needs no allocation per
/// message.
pub async fn write_frame_in<W, T>(writer: &mut W, buf: &mut Vec<u8>, msg: &T) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    buf.clear();
    encode_frame(msg, buf)?;
    writer.write_all(buf).await
}

/// Encodes and writes one frame (not flushed).
pub async fn write_frame<W, T>(writer: &mut W, msg: &T) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut out = Vec::with_capacity(256);
    encode_frame(msg, &mut out)?;
    writer.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MasterMsg;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_frames_are_refused() {
        let mut out = Vec::new();
        encode_frame(&MasterMsg::Ping, &mut out).unwrap();
        encode_frame(
            &MasterMsg::Kill {
                task_id: 7,
                attempt: 2,
            },
            &mut out,
        )
        .unwrap();
        let mut reader = &out[..];
        let mut buf = Vec::new();
        let a: MasterMsg = read_frame(&mut reader, &mut buf).await.unwrap();
        let b: MasterMsg = read_frame(&mut reader, &mut buf).await.unwrap();
        assert_eq!(a, MasterMsg::Ping);
        assert_eq!(
            b,
            MasterMsg::Kill {
                task_id: 7,
                attempt: 2
            }
        );
        assert!(matches!(
            read_frame::<_, MasterMsg>(&mut reader, &mut buf).await,
            Err(FrameError::Closed)
        ));

        let huge = (MAX_FRAME_BYTES + 1).to_be_bytes();
        let mut reader = &huge[..];
        assert!(matches!(
            read_frame::<_, MasterMsg>(&mut reader, &mut buf).await,
            Err(FrameError::TooLarge { .. })
        ));

        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"hello");
        let mut reader = &garbage[..];
        assert!(matches!(
            read_frame::<_, MasterMsg>(&mut reader, &mut buf).await,
            Err(FrameError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn before_authentication_a_large_frame_is_refused_from_its_length_alone() {
        let mut declared = (HANDSHAKE_FRAME_BYTES + 1).to_be_bytes().to_vec();
        declared.push(b'{');
        let mut reader = &declared[..];
        let mut buf = Vec::new();
        let got =
            read_frame_within::<_, MasterMsg>(&mut reader, &mut buf, HANDSHAKE_FRAME_BYTES).await;
        assert!(
            matches!(
                got,
                Err(FrameError::TooLarge { len, cap: HANDSHAKE_FRAME_BYTES }) if len == HANDSHAKE_FRAME_BYTES + 1
            ),
            "{got:?}"
        );
        assert_eq!(buf.capacity(), 0, "nothing allocated for a refused frame");
        // At the cap itself the frame is read.
        let mut ok = Vec::new();
        encode_frame(&MasterMsg::Ping, &mut ok).unwrap();
        let mut reader = &ok[..];
        let msg: MasterMsg = read_frame_within(&mut reader, &mut buf, HANDSHAKE_FRAME_BYTES)
            .await
            .unwrap();
        assert_eq!(msg, MasterMsg::Ping);
    }

    #[tokio::test]
    async fn after_authentication_a_declared_length_is_not_allocated_up_front() {
        // 8 MiB declared, 100 bytes sent, then the peer stalls: what we hold
        // follows what arrived, not what was declared.
        let mut data = MAX_FRAME_BYTES.to_be_bytes().to_vec();
        data.extend_from_slice(&[b' '; 100]);
        // The writing end stays open and says nothing more.
        let (mut peer, mut reader) = tokio::io::duplex(1 << 20);
        peer.write_all(&data).await.unwrap();
        let mut buf = Vec::new();
        let read = read_frame::<_, MasterMsg>(&mut reader, &mut buf);
        let timed_out = tokio::time::timeout(std::time::Duration::from_millis(50), read).await;
        assert!(timed_out.is_err(), "the frame is still incomplete");
        assert!(
            buf.capacity() < 64 * 1024,
            "held {} bytes for 100 received",
            buf.capacity()
        );
        // The same declared length, cut short by the peer closing, is a closed connection.
        let mut data = MAX_FRAME_BYTES.to_be_bytes().to_vec();
        data.extend_from_slice(b"{}");
        let mut reader = &data[..];
        assert!(matches!(
            read_frame::<_, MasterMsg>(&mut reader, &mut buf).await,
            Err(FrameError::Closed)
        ));
        assert!(buf.capacity() < 64 * 1024);
    }

    proptest::proptest! {
        /// Whatever bytes arrive, decoding either side's messages ends in a
        /// message or an error, never a panic, and never holds more than
        /// the bytes given (plus growth slack).
        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
            prefix in proptest::option::of(0u32..4096),
        ) {
            let mut data = prefix.map(|n| n.to_be_bytes().to_vec()).unwrap_or_default();
            data.extend_from_slice(&bytes);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                for cap in [HANDSHAKE_FRAME_BYTES, MAX_FRAME_BYTES] {
                    let mut buf = Vec::new();
                    let mut reader = &data[..];
                    while read_frame_within::<_, crate::WorkerMsg>(&mut reader, &mut buf, cap).await.is_ok() {}
                    proptest::prop_assert!(buf.capacity() <= 2 * data.len() + 64);
                    let mut reader = &data[..];
                    while read_frame_within::<_, MasterMsg>(&mut reader, &mut buf, cap).await.is_ok() {}
                }
                Ok(())
            })?;
        }
    }
}
