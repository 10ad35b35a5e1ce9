//! One worker connection as the engine holds it, and how the engine's
//! frames reach its socket.
//!
//! The frames an engine pass makes for a connection are encoded into the
//! link's buffer and, at the end of the pass, written to the socket by the
//! engine itself when the connection is plain TCP and its writer task has
//! nothing in hand. Handing each frame to the writer task instead cost a
//! channel send, a wake-up of that task (often of the runtime's other thread)
//! and a poll per task: at 1,000 workers, where each pass has about one task
//! per connection, that was the largest share of the master's CPU per task
//! after the socket calls themselves (issue 22). What cannot be written at
//! once (a full socket buffer, TLS, sealed connections, input files) goes to
//! the writer task, in order.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use super::*;

/// What the engine and a connection's writer task share so that their
/// writes never interleave and never overtake each other.
#[derive(Default)]
pub(crate) struct WriteGate {
    /// Someone is writing to the socket now.
    busy: AtomicBool,
    /// Items handed to the writer task and not yet written and flushed by
    /// it: while there are any, the engine's bytes go after them, through
    /// the writer.
    queued: AtomicUsize,
}

impl WriteGate {
    /// Takes the socket if nobody writes to it; false if someone does.
    pub(crate) fn try_enter(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Takes the socket, waiting for the engine's (short, non-blocking)
    /// write to end if it is in one.
    pub(crate) async fn enter(&self) {
        while !self.try_enter() {
            tokio::task::yield_now().await;
        }
    }

    /// Gives the socket back.
    pub(crate) fn leave(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// The writer task wrote and flushed `n` items it was handed.
    pub(crate) fn written(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Release);
    }
}

/// One worker connection, as the engine's outbox holds it.
pub(super) struct Link {
    /// To its writer task.
    tx: mpsc::UnboundedSender<Outgoing>,
    /// To its reader task: output plans (a channel, not a shared map, so
    /// that no lock is taken per task).
    plans: mpsc::UnboundedSender<Outgoing>,
    /// The socket, for the engine's own writes: a duplicate of the
    /// connection's descriptor, so that it stays this connection's for as
    /// long as the engine holds the link (a descriptor number alone could be
    /// another connection's by then). `None` over TLS or with sealed frames,
    /// whose bytes only the writer task can produce.
    direct: Option<std::net::TcpStream>,
    gate: Arc<WriteGate>,
    /// Frames of this engine pass not written yet.
    pending: Vec<u8>,
}

impl Link {
    /// The link of a connection whose writer task reads `tx` and shares
    /// `gate`; `direct` as for [`Link::direct`].
    pub(super) fn new(
        tx: mpsc::UnboundedSender<Outgoing>,
        plans: mpsc::UnboundedSender<Outgoing>,
        direct: Option<std::net::TcpStream>,
        gate: Arc<WriteGate>,
    ) -> Link {
        Link {
            tx,
            plans,
            direct,
            gate,
            pending: Vec::new(),
        }
    }

    /// Queues `item`; true if this made the link's buffer go from empty
    /// to not (the caller then remembers to [`Link::flush`] it).
    pub(super) fn send(&mut self, item: Outgoing) -> bool {
        match item {
            Outgoing::ExpectOutputs { .. } | Outgoing::ForgetOutputs { .. } => {
                let _ = self.plans.send(item);
                false
            }
            Outgoing::Msg(msg) => {
                let was_empty = self.pending.is_empty();
                let len = self.pending.len();
                if crate::wire::encode_master_frame(&msg, &mut self.pending).is_err() {
                    // The writer task meets the same error and ends the
                    // connection, as it did when every message went to it.
                    self.pending.truncate(len);
                    self.flush();
                    self.hand_to_writer(Outgoing::Msg(msg));
                    return false;
                }
                was_empty
            }
            other => {
                // A file body is the writer task's to stream; what came
                // before it goes first.
                self.flush();
                self.hand_to_writer(other);
                false
            }
        }
    }

    fn hand_to_writer(&mut self, item: Outgoing) {
        self.gate.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(item).is_err() {
            // The writer is gone (the connection is ending): nothing will
            // be written, so nothing is owed.
            self.gate.written(1);
        }
    }

    /// Writes this pass's frames: on the socket if it takes them now and
    /// nothing is ahead of them at the writer task, else through the
    /// writer task.
    pub(super) fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if let Some(sock) = &self.direct {
            if self.gate.queued.load(Ordering::Acquire) == 0 && self.gate.try_enter() {
                let written = write_some(sock, &self.pending);
                self.gate.leave();
                if written == self.pending.len() {
                    self.pending.clear();
                    return;
                }
                self.pending.drain(..written);
            }
        }
        let rest = std::mem::take(&mut self.pending);
        self.hand_to_writer(Outgoing::Bytes(rest));
    }
}

/// Writes as much of `bytes` as the socket takes without blocking (it is
/// non-blocking: the runtime made it so); how much that was. An error other
/// than a full buffer is left for the writer task to meet and report.
fn write_some(mut sock: &std::net::TcpStream, bytes: &[u8]) -> usize {
    let mut written = 0;
    while written < bytes.len() {
        match sock.write(&bytes[written..]) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    written
}

/// The engine's own copy of a connection's socket (see [`Link::direct`]):
/// for plain TCP without sealing only.
pub(super) fn direct_socket(writer: &Writer) -> Option<std::net::TcpStream> {
    use drover_protocol::stream::{FrameWriter, RawWrite};
    use std::os::fd::AsFd;
    match writer.get_ref() {
        FrameWriter::Plain(RawWrite::Tcp(half)) => {
            let tcp: &TcpStream = half.as_ref();
            tcp.as_fd()
                .try_clone_to_owned()
                .ok()
                .map(std::net::TcpStream::from)
        }
        _ => None,
    }
}
