//! File bodies: raw bytes that follow a frame announcing their size.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Chunk size of [`copy_body`].
pub const BODY_CHUNK_BYTES: usize = 1 << 20;

/// Copies up to `size` bytes of a file body from `from` to `to` and returns
/// how many it copied (fewer only at end of input), calling `seen` on each
/// chunk (to hash it). A chunk is filled before it is written: on either
/// side, a `tokio::fs::File` costs a hand-off to the blocking pool per
/// call, and `tokio::io::copy`'s 8 KiB calls made a 50 MB input about
/// 6,400 of them on each side of the connection.
pub async fn copy_body<R, W>(
    from: &mut R,
    to: &mut W,
    size: u64,
    mut seen: impl FnMut(&[u8]),
) -> io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; size.min(BODY_CHUNK_BYTES as u64) as usize];
    let mut done = 0u64;
    while done < size {
        let want = (size - done).min(buf.len() as u64) as usize;
        let mut filled = 0;
        while filled < want {
            let n = from.read(&mut buf[filled..want]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        seen(&buf[..filled]);
        to.write_all(&buf[..filled]).await?;
        done += filled as u64;
        if filled < want {
            break;
        }
    }
    Ok(done)
}

/// Writes `n` zero bytes: what stands in for the rest of a file that shrank
/// while it was sent, so the stream stays in step with the size announced
/// in its frame (a content-named file then fails its hash check).
pub async fn pad<W: AsyncWrite + Unpin>(to: &mut W, n: u64) -> io::Result<()> {
    let zeros = vec![0u8; n.min(64 * 1024) as usize];
    let mut left = n;
    while left > 0 {
        let k = left.min(zeros.len() as u64) as usize;
        to.write_all(&zeros[..k]).await?;
        left -= k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_is_copied_exactly_in_full_chunks_and_seen_whole() {
        let data: Vec<u8> = (0..(BODY_CHUNK_BYTES * 2 + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        // Exactly `size` bytes, even with more input behind them (the next frame).
        let (mut out, mut seen, mut chunks) = (Vec::new(), Vec::new(), 0);
        let size = BODY_CHUNK_BYTES as u64 + 7;
        let n = copy_body(&mut &data[..], &mut out, size, |c| {
            seen.extend_from_slice(c);
            chunks += 1;
        })
        .await
        .unwrap();
        assert_eq!(n, size);
        assert_eq!(out, data[..size as usize]);
        assert_eq!(seen, out);
        assert_eq!(chunks, 2, "one full chunk, then the rest");
        // Input that ends early: what there was, and the caller sees the shortfall.
        let mut out = Vec::new();
        let n = copy_body(&mut &data[..10], &mut out, 100, |_| {})
            .await
            .unwrap();
        assert_eq!((n, out.as_slice()), (10, &data[..10]));
    }

    #[tokio::test]
    async fn padding_is_exactly_the_shortfall_in_zeros() {
        for n in [0u64, 1, 64 * 1024, 64 * 1024 + 1, 200_000] {
            let mut out = Vec::new();
            pad(&mut out, n).await.unwrap();
            assert_eq!(out.len() as u64, n);
            assert!(out.iter().all(|&b| b == 0));
        }
    }
}
