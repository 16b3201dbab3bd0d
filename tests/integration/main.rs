//! vqclip's integration tests, one binary (faster to link than one per file).
//!
//! Everything runs offline: SQLite in temporary directories, PostgreSQL on loopback (started
//! from the installed server programs when `VQCLIP_TEST_POSTGRES_URL` names none), the real `vqclip` binary for the
//! command line, a loopback fake Hugging Face Hub for downloads. `TEST_LOG=1` prints the code's logs.

mod batch;
mod batching;
mod bot;
mod bot_actions;
mod bot_blend;
mod bot_canvas;
mod bot_describe;
mod bot_grid;
mod bot_remix;
mod browser;
mod cli;
mod config;
mod discord_spec;
mod ensemble;
mod fake_discord;
mod fake_hub;
mod fuzz;
mod hub;
mod method;
mod parity;
mod pipeline;
mod postgres;
mod scheduler;
mod store;
mod support;
mod torch_zip;
mod vqgan;
mod web;
mod web_gallery;
