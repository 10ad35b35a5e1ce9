//! Self-contained, relocatable, content-addressed Python environments.
//!
//! - [`analyze`] derives a [`spec::Spec`] from a script's imports.
//! - [`create`] builds the environment a spec describes into a reproducible
//!   `.tar.gz` named by its BLAKE3 content hash, through a [`cache`] keyed by
//!   the normalized spec.
//! - [`ensure_unpacked`] unpacks an environment once per worker (atomically,
//!   safe under concurrency) and [`activation_env`] gives the variables to
//!   run a command inside it.
//! - [`run_in_environment`] runs one command inside an environment
//!   (`drover pack run`).

pub mod analyze;
pub mod archive;
pub mod cache;
mod command;
pub mod create;
pub mod elf;
pub mod meta;
pub mod python;
pub mod spec;
mod unpack;

pub use command::run_in_environment;
pub use unpack::{
    activation_env, ensure_unpacked, hash_file, hash_from_name, unpack_once, Unpacked,
};
