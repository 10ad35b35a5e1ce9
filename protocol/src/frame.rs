//! Frames: a `u32` big-endian length, then that many bytes of JSON.

use std::io;

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame either side accepts. Task descriptions and reports are far
/// smaller; file bodies are streamed outside frames.
pub const MAX_FRAME_BYTES: u32 = 8 * 1024 * 1024;

/// Errors while reading a frame.
#[derive(thiserror::Error, Debug)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(transparent)]
    Io(io::Error),
}

/// Reads one frame and decodes it. `buf` is reused across calls to avoid an allocation per frame.
pub async fn read_frame<R, T>(reader: &mut R, buf: &mut Vec<u8>) -> Result<T, FrameError>
where
    R: tokio::io::AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let len = match reader.read_u32().await {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Io(e)),
    };
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    buf.clear();
    buf.resize(len as usize, 0);
    reader.read_exact(buf).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(serde_json::from_slice(buf)?)
}

/// Encodes `msg` as a frame and appends it to `out` (no I/O, so callers can batch frames).
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut *out, msg).map_err(io::Error::other)?;
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
            Err(FrameError::TooLarge(_))
        ));

        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"hello");
        let mut reader = &garbage[..];
        assert!(matches!(
            read_frame::<_, MasterMsg>(&mut reader, &mut buf).await,
            Err(FrameError::Malformed(_))
        ));
    }
}
