//! The password handshake, both halves in one place.
//!
//! The worker (or a status client) speaks first: [`WorkerMsg::Hello`] or
//! [`WorkerMsg::StatusQuery`]. The master answers [`MasterMsg::Refused`]
//! (version mismatch, password required or wrong) or, when it has a
//! password, [`MasterMsg::Challenge`] with a fresh nonce. The worker answers
//! with its own nonce and `HMAC-SHA256(password, "drover-worker" ‖
//! master_nonce ‖ worker_nonce)`; the master checks it and proves itself in
//! [`MasterMsg::Welcome`] (or [`MasterMsg::Status`]) with
//! `HMAC-SHA256(password, "drover-master" ‖ worker_nonce ‖ master_nonce)`.
//! The password never crosses the wire and a recorded exchange cannot be
//! replayed because both sides pick a nonce. A welcomed worker then sends
//! the ids in its file cache ([`WorkerMsg::Cached`]), the first frame read
//! under the full frame limit: until then every frame is capped at
//! [`HANDSHAKE_FRAME_BYTES`].
//!
//! Each half is a state machine ([`MasterHandshake`], [`PeerHandshake`]):
//! fed the message that arrived, it answers a [`Step`] (what to send, and
//! whether it is over). [`Proofs`] is the part both halves share, so the
//! proof one side makes is checked by the very code the other side runs.
//! [`run`] drives either half over a connection.

use std::io;

use hmac::{Hmac, Mac};
use serde::{de::DeserializeOwned, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::frame::{
    read_frame_within, write_frame, FrameError, HANDSHAKE_FRAME_BYTES, MAX_FRAME_BYTES,
};
use crate::messages::{Hello, MasterMsg, WorkerMsg, PROTOCOL_VERSION};
use crate::stream::SessionKeys;

type HmacSha256 = Hmac<Sha256>;

/// A fresh random nonce, hex-encoded.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The proof that `role` knows `password`, bound to both nonces.
pub fn auth_proof(password: &[u8], role: &str, first: &str, second: &str) -> String {
    hex::encode(
        proof_mac(password, role, first, second, None)
            .finalize()
            .into_bytes(),
    )
}

/// Checks a proof in constant time.
pub fn verify_proof(password: &[u8], role: &str, first: &str, second: &str, proof: &str) -> bool {
    verify_bound(password, role, first, second, None, proof)
}

/// The MAC of a proof; `binding` (a TLS session's exported value) ties it
/// to one TLS session, so a relay that terminates TLS on both sides cannot
/// pass a proof on.
fn proof_mac(
    password: &[u8],
    role: &str,
    first: &str,
    second: &str,
    binding: Option<&[u8; 32]>,
) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(password).expect("HMAC takes any key length");
    mac.update(role.as_bytes());
    mac.update(first.as_bytes());
    mac.update(second.as_bytes());
    if let Some(b) = binding {
        mac.update(b"tls-binding");
        mac.update(b);
    }
    mac
}

fn verify_bound(
    password: &[u8],
    role: &str,
    first: &str,
    second: &str,
    binding: Option<&[u8; 32]>,
    proof: &str,
) -> bool {
    let Ok(given) = hex::decode(proof) else {
        return false;
    };
    proof_mac(password, role, first, second, binding)
        .verify_slice(&given)
        .is_ok()
}

/// Role strings bound into the proofs, so a worker's proof can't be reflected back as the master's.
pub const ROLE_WORKER: &str = "drover-worker";
/// The master's role string (see [`ROLE_WORKER`]).
pub const ROLE_MASTER: &str = "drover-master";

/// Reads a password file: its content with one trailing newline removed
/// (a warning is logged when others can read it; see
/// [`drover_catalog::secret::read_secret_file`]).
pub fn read_password_file(path: &std::path::Path) -> io::Result<Vec<u8>> {
    drover_catalog::secret::read_secret_file(path, "password")
}

/// Which end of a connection a party is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The master, which proves itself last.
    Master,
    /// A worker, or a status client: it proves itself as a worker does.
    Worker,
}

impl Side {
    fn role(self) -> &'static str {
        match self {
            Side::Master => ROLE_MASTER,
            Side::Worker => ROLE_WORKER,
        }
    }

    fn peer(self) -> Side {
        match self {
            Side::Master => Side::Worker,
            Side::Worker => Side::Master,
        }
    }
}

/// One party's proofs in one handshake: its own nonce and, once it is
/// known, the peer's. Each side proves over (peer's nonce, own nonce) and
/// checks the peer over (own nonce, peer's nonce), so the two agree.
#[derive(Debug)]
pub struct Proofs {
    side: Side,
    mine: String,
    theirs: String,
    binding: Option<[u8; 32]>,
}

impl Proofs {
    /// Proofs for `side`, with a fresh nonce of its own and the peer's `theirs`.
    pub fn new(side: Side, theirs: String) -> Proofs {
        Proofs {
            side,
            mine: new_nonce(),
            theirs,
            binding: None,
        }
    }

    /// Ties both proofs to a TLS session (see [`crate::tls::binding`]).
    pub fn bind(mut self, binding: Option<[u8; 32]>) -> Proofs {
        self.binding = binding;
        self
    }

    /// The record keys of this connection (see [`SessionKeys`]).
    pub fn session_keys(&self, password: &[u8]) -> SessionKeys {
        match self.side {
            Side::Master => SessionKeys::derive(password, &self.mine, &self.theirs),
            Side::Worker => SessionKeys::derive(password, &self.theirs, &self.mine),
        }
    }

    /// This party's nonce, to send.
    pub fn nonce(&self) -> &str {
        &self.mine
    }

    /// This party's proof that it knows `password`.
    pub fn prove(&self, password: &[u8]) -> String {
        let mac = proof_mac(
            password,
            self.side.role(),
            &self.theirs,
            &self.mine,
            self.binding.as_ref(),
        );
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether the peer's `proof` shows that it knows `password`.
    pub fn check(&self, password: &[u8], proof: &str) -> bool {
        verify_bound(
            password,
            self.side.peer().role(),
            &self.mine,
            &self.theirs,
            self.binding.as_ref(),
            proof,
        )
    }
}

/// Why a handshake failed. Its text is meant for a person.
#[derive(thiserror::Error, Debug)]
pub enum AuthError {
    #[error("the connection closed during the handshake")]
    Closed,
    #[error("bad frame during the handshake: {0}")]
    Frame(FrameError),
    /// The master refused the peer, for this reason (also sent to the peer).
    #[error("{0}")]
    Refused(String),
    /// The peer expected a password and was never asked for it, or was
    /// asked for one it does not have.
    #[error("{0}")]
    Password(String),
    #[error("unexpected message during the handshake: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Io(io::Error),
}

/// A peer that closes with our bytes unread makes its kernel answer with a
/// reset, which our next read or write gets instead of the end of the
/// stream: it is the same closed connection, and is said so.
fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

impl From<io::Error> for AuthError {
    fn from(e: io::Error) -> AuthError {
        if is_closed(&e) {
            AuthError::Closed
        } else {
            AuthError::Io(e)
        }
    }
}

impl From<FrameError> for AuthError {
    fn from(e: FrameError) -> AuthError {
        match e {
            FrameError::Closed => AuthError::Closed,
            FrameError::Io(e) if is_closed(&e) => AuthError::Closed,
            other => AuthError::Frame(other),
        }
    }
}

/// What a handshake's state machine says after each message it is fed.
#[derive(Debug)]
pub enum Step<Out, Done> {
    /// Send this and read the next message.
    Reply(Out),
    /// The handshake succeeded: send `reply` if any, then go on with `done`.
    Finish { reply: Option<Out>, done: Done },
    /// The handshake failed: send `reply` if any (a refusal), then close.
    Fail {
        reply: Option<Out>,
        error: AuthError,
    },
}

/// One half of the handshake, as [`run`] drives it.
pub trait Handshake {
    /// What the peer sends.
    type In: DeserializeOwned;
    /// What this side sends.
    type Out: Serialize;
    /// What a successful handshake hands on.
    type Done;
    /// Takes the next message from the peer.
    fn step(&mut self, msg: Self::In) -> Step<Self::Out, Self::Done>;
    /// The largest frame the next message may be: small until the peer is
    /// known, so an unknown peer cannot choose how much we allocate.
    fn frame_cap(&self) -> u32 {
        HANDSHAKE_FRAME_BYTES
    }
}

/// Drives `handshake` over a connection: sends `first` (the side that speaks
/// first), then reads, steps and answers until it finishes or fails.
pub async fn run<H, R, W>(
    handshake: &mut H,
    reader: &mut R,
    writer: &mut W,
    first: Option<H::Out>,
) -> Result<H::Done, AuthError>
where
    H: Handshake,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn send<W: AsyncWrite + Unpin, T: Serialize>(
        w: &mut W,
        msg: Option<T>,
    ) -> io::Result<()> {
        if let Some(msg) = msg {
            write_frame(w, &msg).await?;
            w.flush().await?;
        }
        Ok(())
    }
    send(writer, first).await?;
    let mut buf = Vec::new();
    loop {
        let msg = read_frame_within(reader, &mut buf, handshake.frame_cap()).await?;
        match handshake.step(msg) {
            Step::Reply(out) => send(writer, Some(out)).await?,
            Step::Finish { reply, done } => {
                send(writer, reply).await?;
                return Ok(done);
            }
            Step::Fail { reply, error } => {
                // The refusal is a courtesy; the error is what matters.
                let _ = send(writer, reply).await;
                return Err(error);
            }
        }
    }
}

/// Who passed the master's half of the handshake.
#[derive(Debug, PartialEq)]
pub enum Greeting {
    /// A worker, with its file cache in `hello.cached`.
    Worker(Box<Hello>),
    /// A status client. It got no welcome: `proof` is the master's, owed in
    /// the status answer ([`MasterMsg::Status`]).
    Status { proof: Option<String> },
}

enum MasterState {
    Hello,
    Proof { proofs: Proofs, first: Opening },
    Cached(Box<Hello>),
    Over,
}

/// What the peer opened with.
enum Opening {
    Worker(Box<Hello>),
    Status,
}

/// The master's half: refuses a peer of another protocol version or with
/// the wrong password, challenges it when there is a password, welcomes a
/// worker (and reads its cache list) or hands a status client on.
pub struct MasterHandshake<'a> {
    password: Option<&'a [u8]>,
    keepalive_interval_s: f64,
    state: MasterState,
    binding: Option<[u8; 32]>,
    keys: Option<SessionKeys>,
}

impl<'a> MasterHandshake<'a> {
    /// A handshake for a master with `password` (if any) that pings its
    /// workers every `keepalive_interval_s`.
    pub fn new(password: Option<&'a [u8]>, keepalive_interval_s: f64) -> Self {
        MasterHandshake {
            password,
            keepalive_interval_s,
            state: MasterState::Hello,
            binding: None,
            keys: None,
        }
    }

    /// Ties the proofs to the TLS session the handshake runs in.
    pub fn bound_to(mut self, binding: Option<[u8; 32]>) -> Self {
        self.binding = binding;
        self
    }

    /// The record keys of this connection, once the peer proved that it
    /// knows the password (`None` without one).
    pub fn session_keys(&self) -> Option<SessionKeys> {
        self.keys.clone()
    }

    fn refuse(reason: String) -> Step<MasterMsg, Greeting> {
        Step::Fail {
            reply: Some(MasterMsg::Refused {
                reason: reason.clone(),
            }),
            error: AuthError::Refused(reason),
        }
    }

    fn opened(&mut self, msg: WorkerMsg) -> Step<MasterMsg, Greeting> {
        // A status client goes through the same checks as a worker; only the
        // last step differs.
        let (first, version, has_password, who) = match msg {
            WorkerMsg::Hello(hello) => {
                let (v, p) = (hello.protocol, hello.password);
                let who = format!(
                    "worker {} (drover {})",
                    hello.hostname, hello.drover_version
                );
                (Opening::Worker(hello), v, p, who)
            }
            WorkerMsg::StatusQuery { protocol, password } => (
                Opening::Status,
                protocol,
                password,
                "status client".to_string(),
            ),
            other => {
                return Step::Fail {
                    reply: None,
                    error: AuthError::Unexpected(format!("expected a hello, got {other:?}")),
                }
            }
        };
        if version != PROTOCOL_VERSION {
            return Self::refuse(format!(
                "protocol version mismatch: this master speaks version {PROTOCOL_VERSION} (drover {}), the {who} version {version}",
                env!("CARGO_PKG_VERSION"),
            ));
        }
        match (self.password.is_some(), has_password) {
            (true, false) => {
                return Self::refuse(
                    "this master requires a password; start the worker with --password-file"
                        .into(),
                )
            }
            (false, true) => return Self::refuse(
                "this master has no password but the worker was given one; refusing so that neither side is fooled".into(),
            ),
            _ => {}
        }
        if self.password.is_none() {
            return self.accept(first, None);
        }
        let proofs = Proofs::new(Side::Master, String::new()).bind(self.binding);
        let nonce = proofs.nonce().to_string();
        self.state = MasterState::Proof { proofs, first };
        Step::Reply(MasterMsg::Challenge { nonce })
    }

    fn proved(
        &mut self,
        msg: WorkerMsg,
        mut proofs: Proofs,
        first: Opening,
    ) -> Step<MasterMsg, Greeting> {
        let WorkerMsg::AuthProof { nonce, proof } = msg else {
            return Step::Fail {
                reply: None,
                error: AuthError::Unexpected(format!("expected a password proof, got {msg:?}")),
            };
        };
        let Some(password) = self.password else {
            unreachable!("a challenge is only sent with a password");
        };
        proofs.theirs = nonce;
        if !proofs.check(password, &proof) {
            let who = match &first {
                Opening::Worker(h) => format!("worker {}", h.hostname),
                Opening::Status => "status client".into(),
            };
            return Step::Fail {
                reply: Some(MasterMsg::Refused {
                    reason: "wrong password".into(),
                }),
                error: AuthError::Password(format!("{who} gave a wrong password")),
            };
        }
        self.keys = Some(proofs.session_keys(password));
        self.accept(first, Some(proofs.prove(password)))
    }

    fn accept(&mut self, first: Opening, proof: Option<String>) -> Step<MasterMsg, Greeting> {
        match first {
            Opening::Status => {
                self.state = MasterState::Over;
                Step::Finish {
                    reply: None,
                    done: Greeting::Status { proof },
                }
            }
            Opening::Worker(hello) => {
                self.state = MasterState::Cached(hello);
                Step::Reply(MasterMsg::Welcome {
                    proof,
                    keepalive_interval_s: self.keepalive_interval_s,
                })
            }
        }
    }
}

impl Handshake for MasterHandshake<'_> {
    type In = WorkerMsg;
    type Out = MasterMsg;
    type Done = Greeting;

    fn step(&mut self, msg: WorkerMsg) -> Step<MasterMsg, Greeting> {
        match std::mem::replace(&mut self.state, MasterState::Over) {
            MasterState::Hello => self.opened(msg),
            MasterState::Proof { proofs, first } => self.proved(msg, proofs, first),
            MasterState::Cached(mut hello) => match msg {
                WorkerMsg::Cached { ids } => {
                    hello.cached = ids;
                    Step::Finish {
                        reply: None,
                        done: Greeting::Worker(hello),
                    }
                }
                other => Step::Fail {
                    reply: None,
                    error: AuthError::Unexpected(format!(
                        "expected the worker's cache list, got {other:?}"
                    )),
                },
            },
            MasterState::Over => Step::Fail {
                reply: None,
                error: AuthError::Unexpected(format!("{msg:?} after the handshake ended")),
            },
        }
    }

    fn frame_cap(&self) -> u32 {
        // Only a welcomed worker gets here.
        match self.state {
            MasterState::Cached(_) => MAX_FRAME_BYTES,
            _ => HANDSHAKE_FRAME_BYTES,
        }
    }
}

/// What the master's answer to a peer's handshake held, once its proof (if
/// any) checked out.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// A worker was welcomed; the master pings every this many seconds.
    Welcome { keepalive_interval_s: f64 },
    /// A status client got the master's report.
    Status(Box<drover_catalog::MasterReport>),
}

/// The half of a worker or status client: answers a challenge and checks the
/// master's proof in its welcome or status answer. A worker then sends its
/// cache list.
pub struct PeerHandshake<'a> {
    password: Option<&'a [u8]>,
    proofs: Option<Proofs>,
    cached: Option<Vec<String>>,
    binding: Option<[u8; 32]>,
}

impl<'a> PeerHandshake<'a> {
    /// A worker's handshake: returns it and the hello to open with.
    /// `cached` goes to the master after the welcome.
    pub fn worker(
        password: Option<&'a [u8]>,
        hello: Hello,
        cached: Vec<String>,
    ) -> (Self, WorkerMsg) {
        let hs = PeerHandshake {
            password,
            proofs: None,
            cached: Some(cached),
            binding: None,
        };
        (hs, WorkerMsg::Hello(Box::new(hello)))
    }

    /// A status client's handshake: returns it and the query to open with.
    pub fn status(password: Option<&'a [u8]>) -> (Self, WorkerMsg) {
        let hs = PeerHandshake {
            password,
            proofs: None,
            cached: None,
            binding: None,
        };
        let query = WorkerMsg::StatusQuery {
            protocol: PROTOCOL_VERSION,
            password: password.is_some(),
        };
        (hs, query)
    }

    /// Ties the proofs to the TLS session the handshake runs in.
    pub fn bound_to(mut self, binding: Option<[u8; 32]>) -> Self {
        self.binding = binding;
        self
    }

    /// The record keys of this connection, once the master proved that it
    /// knows the password (`None` without one, or before).
    pub fn session_keys(&self) -> Option<SessionKeys> {
        match (self.password, &self.proofs) {
            (Some(pw), Some(proofs)) => Some(proofs.session_keys(pw)),
            _ => None,
        }
    }

    fn fail(error: AuthError) -> Step<WorkerMsg, Answer> {
        Step::Fail { reply: None, error }
    }

    /// Whether `proof` shows that the master knows our password (true when
    /// there is none to know).
    fn master_proved(&self, proof: Option<&str>) -> bool {
        let Some(password) = self.password else {
            return true;
        };
        match (&self.proofs, proof) {
            (Some(proofs), Some(proof)) => proofs.check(password, proof),
            _ => false,
        }
    }
}

impl Handshake for PeerHandshake<'_> {
    type In = MasterMsg;
    type Out = WorkerMsg;
    type Done = Answer;

    fn step(&mut self, msg: MasterMsg) -> Step<WorkerMsg, Answer> {
        let unproven = || {
            AuthError::Password(
                "the master did not prove that it knows the password; refusing to work for it"
                    .into(),
            )
        };
        match msg {
            MasterMsg::Refused { reason } => Self::fail(AuthError::Refused(reason)),
            MasterMsg::Challenge { nonce } => {
                let Some(password) = self.password else {
                    return Self::fail(AuthError::Password(
                        "the master requires a password; start with --password-file".into(),
                    ));
                };
                if self.proofs.is_some() {
                    return Self::fail(AuthError::Unexpected("a second challenge".into()));
                }
                let proofs = Proofs::new(Side::Worker, nonce).bind(self.binding);
                let reply = WorkerMsg::AuthProof {
                    nonce: proofs.nonce().to_string(),
                    proof: proofs.prove(password),
                };
                self.proofs = Some(proofs);
                Step::Reply(reply)
            }
            MasterMsg::Welcome {
                proof,
                keepalive_interval_s,
            } if self.cached.is_some() => {
                if !self.master_proved(proof.as_deref()) {
                    return Self::fail(unproven());
                }
                let ids = self.cached.take().unwrap_or_default();
                Step::Finish {
                    reply: Some(WorkerMsg::Cached { ids }),
                    done: Answer::Welcome {
                        keepalive_interval_s,
                    },
                }
            }
            MasterMsg::Status { proof, report } if self.cached.is_none() => {
                if !self.master_proved(proof.as_deref()) {
                    return Self::fail(unproven());
                }
                Step::Finish {
                    reply: None,
                    done: Answer::Status(report),
                }
            }
            other => Self::fail(AuthError::Unexpected(format!("{other:?}"))),
        }
    }
    fn frame_cap(&self) -> u32 {
        // A status client asked for the master's report, which may be long
        // (a line per worker); a worker expects only short answers.
        if self.cached.is_none() {
            MAX_FRAME_BYTES
        } else {
            HANDSHAKE_FRAME_BYTES
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_role_password_and_nonces() {
        let (m, w) = (new_nonce(), new_nonce());
        let proof = auth_proof(b"secret", ROLE_WORKER, &m, &w);
        assert!(verify_proof(b"secret", ROLE_WORKER, &m, &w, &proof));
        assert!(!verify_proof(b"wrong", ROLE_WORKER, &m, &w, &proof));
        assert!(!verify_proof(b"secret", ROLE_MASTER, &m, &w, &proof));
        assert!(!verify_proof(b"secret", ROLE_WORKER, &w, &m, &proof));
        assert!(!verify_proof(b"secret", ROLE_WORKER, &m, &w, "zz"));
    }

    use crate::Resources;

    fn hello(password: bool) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            drover_version: "test".into(),
            hostname: "node1".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            resources: Resources::default(),
            password,
            cached: Vec::new(),
        }
    }

    /// Both halves over an in-memory connection: what the master and the
    /// worker each end with.
    async fn meet(
        master_pw: Option<&[u8]>,
        worker_pw: Option<&[u8]>,
    ) -> (Result<Greeting, AuthError>, Result<Answer, AuthError>) {
        let (m, w) = tokio::io::duplex(64 * 1024);
        let (mut mr, mut mw) = tokio::io::split(m);
        let (mut wr, mut ww) = tokio::io::split(w);
        let mut master = MasterHandshake::new(master_pw, 2.5);
        let cached = vec!["b3-aa".to_string(); 1000];
        let (mut worker, first) =
            PeerHandshake::worker(worker_pw, hello(worker_pw.is_some()), cached);
        tokio::join!(
            async {
                let r = run(&mut master, &mut mr, &mut mw, None).await;
                drop(mw);
                r
            },
            async {
                let r = run(&mut worker, &mut wr, &mut ww, Some(first)).await;
                drop(ww);
                r
            }
        )
    }

    #[tokio::test]
    async fn matching_passwords_welcome_the_worker_with_its_whole_cache_list() {
        for pw in [None, Some(&b"secret"[..])] {
            let (master, worker) = meet(pw, pw).await;
            let Ok(Greeting::Worker(hello)) = master else {
                panic!("{master:?}");
            };
            // A thousand ids are over the handshake's frame cap; they come after the welcome.
            assert_eq!(hello.cached.len(), 1000);
            assert_eq!(
                worker.unwrap(),
                Answer::Welcome {
                    keepalive_interval_s: 2.5
                }
            );
        }
    }

    #[tokio::test]
    async fn mismatched_passwords_are_refused_on_both_sides_with_the_reason() {
        let (master, worker) = meet(Some(b"right"), Some(b"wrong")).await;
        assert!(master
            .unwrap_err()
            .to_string()
            .contains("gave a wrong password"));
        assert_eq!(worker.unwrap_err().to_string(), "wrong password");

        let (master, worker) = meet(Some(b"pw"), None).await;
        assert!(master
            .unwrap_err()
            .to_string()
            .contains("requires a password"));
        assert!(worker
            .unwrap_err()
            .to_string()
            .contains("requires a password"));

        let (master, worker) = meet(None, Some(b"pw")).await;
        assert!(master.unwrap_err().to_string().contains("no password"));
        assert!(worker.unwrap_err().to_string().contains("no password"));
    }

    #[test]
    fn a_worker_refuses_a_master_that_does_not_prove_the_password() {
        let (mut worker, _) = PeerHandshake::worker(Some(b"pw"), hello(true), Vec::new());
        let Step::Reply(WorkerMsg::AuthProof { .. }) =
            worker.step(MasterMsg::Challenge { nonce: new_nonce() })
        else {
            panic!("a challenge is answered with a proof");
        };
        let welcome = |proof: Option<&str>| MasterMsg::Welcome {
            proof: proof.map(str::to_string),
            keepalive_interval_s: 1.0,
        };
        for forged in [None, Some("00"), Some("not hex")] {
            let step = worker.step(welcome(forged));
            assert!(
                matches!(&step, Step::Fail { error: AuthError::Password(m), .. } if m.contains("did not prove")),
                "{step:?}"
            );
        }
        // Welcomed without a challenge at all, by a master that skipped it.
        let (mut worker, _) = PeerHandshake::worker(Some(b"pw"), hello(true), Vec::new());
        assert!(matches!(worker.step(welcome(None)), Step::Fail { .. }));
    }

    #[tokio::test]
    async fn a_status_client_is_challenged_like_a_worker_and_checks_the_answer() {
        let (m, w) = tokio::io::duplex(64 * 1024);
        let (mut mr, mut mw) = tokio::io::split(m);
        let (mut wr, mut ww) = tokio::io::split(w);
        let mut master = MasterHandshake::new(Some(b"pw"), 1.0);
        let (mut client, query) = PeerHandshake::status(Some(b"pw"));
        let report = drover_catalog::MasterReport {
            project: "p".into(),
            ..Default::default()
        };
        let (served, answer) = tokio::join!(
            async {
                let Greeting::Status { proof } = run(&mut master, &mut mr, &mut mw, None).await?
                else {
                    panic!("a status client is not a worker");
                };
                let status = MasterMsg::Status {
                    proof,
                    report: Box::new(report.clone()),
                };
                write_frame(&mut mw, &status).await?;
                mw.flush().await?;
                Ok::<_, AuthError>(())
            },
            run(&mut client, &mut wr, &mut ww, Some(query))
        );
        served.unwrap();
        assert_eq!(answer.unwrap(), Answer::Status(Box::new(report)));
    }

    #[test]
    fn a_long_cache_list_would_not_fit_in_the_hello() {
        let master = MasterHandshake::new(None, 1.0);
        assert_eq!(master.frame_cap(), HANDSHAKE_FRAME_BYTES);
        let mut big = hello(false);
        big.cached = vec![
            "b3-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .into();
            1000
        ];
        let mut frame = Vec::new();
        crate::encode_frame(&WorkerMsg::Hello(Box::new(big)), &mut frame).unwrap();
        assert!(frame.len() > HANDSHAKE_FRAME_BYTES as usize);
    }
}
