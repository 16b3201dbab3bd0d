//! vqclip: a Discord bot that turns `/imagine <prompt>` into VQGAN+CLIP art.
//!
//! # Architecture
//!
//! ```text
//!   bot ──▶ jobs ──▶ engine          one-way: nothing points back up
//!    │       │
//!    └──▶ store ◀──┘                 SQLite or PostgreSQL: jobs, gallery, votes, users, guilds
//! ```
//!
//! Inside each module the files point one way too (no file imports one that imports it back);
//! each module's `//!` says what it may and may not know.
//!
//! - [`bot`] (poise on serenity) answers commands, buttons and reactions, edits progress
//!   messages, posts results and the gallery. It knows Discord; nothing below it does.
//! - [`jobs`] is the per-device scheduler: a fair queue, one OS thread per device driving the
//!   engine, progress events, cancellation, checkpoints and crash recovery. It knows nothing of
//!   Discord.
//! - [`engine`] is the synchronous VQGAN+CLIP optimisation on candle, in layers: the method,
//!   `nets` (VQGAN, CLIP, weight files), `ops` (hand-written input gradients), `kernels` (CPU).
//!   It knows nothing of tokio, Discord, SQL or the network: it takes weight files and a spec
//!   and reports through a callback.
//! - [`store`] is the database (sqlx, migrations for SQLite and PostgreSQL), used by `bot` and
//!   `jobs`.
//! - [`app`] runs `serve` and `worker`: startup, the intake loop, shutdown.
//! - [`config`] loads and validates the configuration; [`models`] is the catalogue of model
//!   names and where their weights come from, with `weights` (finding their files), `hub`
//!   (downloading and checking them) and `load` (building them on a device); [`request`] turns what a user typed into an engine spec;
//!   [`telemetry`] sets up logging; [`cli`] is the command line the binary runs; [`mod@bench`]
//!   times one optimisation step the way the PyTorch reference does; [`selftest`] runs the
//!   PyTorch parity cases on a device; [`inspect`] runs CLIP on the bot's CPU for `/describe`
//!   and the safety check of results.
//!
//! Only what the binary, the tests and the benchmarks use is `pub`; the rest is crate-private
//! and documented all the same: read these docs with `cargo doc --document-private-items`.

// The overviews link the private modules and items a reader needs; they resolve in the docs
// built with private items, which is how this crate's docs are meant to be read.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod app;
pub(crate) mod bench;
pub mod bot;
pub mod cli;
pub mod config;
pub mod engine;
pub mod inspect;
pub mod jobs;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod request;
pub mod selftest;
pub mod store;
pub mod telemetry;
pub mod web;
