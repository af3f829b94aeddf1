//! The `ninja-migrate` subcommands.

pub mod demo;
pub mod guest;
pub mod plan;
pub mod vmm;
