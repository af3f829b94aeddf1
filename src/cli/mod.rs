//! The `ninja-migrate` subcommands.

pub mod cut;
pub mod demo;
pub mod guest;
pub mod mpi;
pub mod plan;
pub mod vmm;
