//! The `ninja-migrate` subcommands.

pub mod demo;
pub mod guest;
pub mod vmm;
