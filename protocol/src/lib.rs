//! The master/worker wire protocol, shared by both ends and by clients that
//! only ask a master's status (`drover factory`). It links no scheduling and
//! no process code: a node that only runs workers, and the factory, need
//! nothing more of the master than this.
//!
//! Every message is a frame: a `u32` big-endian length, then that many bytes
//! of JSON (one [`MasterMsg`] or [`WorkerMsg`], tagged by `type`). File bodies
//! never travel inside frames: a [`MasterMsg::PutFile`] or
//! [`WorkerMsg::TaskDone`] header announces sizes and the raw bytes follow
//! the frame directly, so a file is streamed and never held whole in memory.
//! A frame longer than [`MAX_FRAME_BYTES`] closes the connection, because a
//! peer that sends one is either broken or hostile, and reading it would let
//! it choose how much memory we allocate.
//!
//! Handshake: see [`auth`]. Before it completes, no frame may be longer
//! than [`HANDSHAKE_FRAME_BYTES`].
//!
//! Growth in place: a task sent with [`RunTask::growable`] that goes over its
//! memory allocation is frozen by the worker, which asks
//! [`WorkerMsg::Grow`]; the master answers [`MasterMsg::Grow`] with a bigger
//! allocation (the task goes on) or none (it is killed as over its limit,
//! and retried as before).
//!
//! A client that only wants the master's status (`drover factory`) sends
//! [`WorkerMsg::StatusQuery`] instead of a hello and goes through the same
//! refusal and challenge steps; the master then answers [`MasterMsg::Status`]
//! (with its proof in place of the welcome's) and closes the connection.
//!
//! Modules, each one idea: [`messages`] (what each side says), [`frame`]
//! (how a message is delimited on the wire), [`body`] (file bodies after a
//! frame), [`auth`] (the password handshake), [`names`] (sandbox name rules,
//! output cap), [`resources`] (the resource vector), [`packing`] (how many
//! workers a set of waiting tasks can use), [`host`] (this machine's name),
//! [`stream`] (a connection's byte streams after the handshake: plain,
//! sealed records under the password, or TLS), [`tls`] (certificates and
//! trust).

pub mod auth;
pub mod body;
pub mod frame;
pub mod host;
pub mod messages;
pub mod names;
pub mod packing;
pub mod resources;
pub mod stream;
pub mod tls;

pub use auth::{
    auth_proof, new_nonce, read_password_file, verify_proof, AuthError, Greeting, MasterHandshake,
    PeerHandshake, ROLE_MASTER, ROLE_WORKER,
};
pub use body::{copy_body, pad, BODY_CHUNK_BYTES};
pub use frame::{
    encode_frame, encode_frame_with, read_frame, read_frame_body, read_frame_within, write_frame,
    write_frame_in, FrameError, HANDSHAKE_FRAME_BYTES, MAX_FRAME_BYTES,
};
pub use host::hostname;
pub use messages::{
    Ending, FunctionCall, Hello, InputRef, LimitHit, MasterMsg, Measured, OutputHeader, RunTask,
    TaskReport, WorkerMsg, CALL_FILE, INLINE_CALL_BYTES, INLINE_RESULT_BYTES, PROTOCOL_VERSION,
};
pub use names::{cap_output, check_sandbox_name, OUTPUT_CAP_BYTES};
pub use resources::Resources;
