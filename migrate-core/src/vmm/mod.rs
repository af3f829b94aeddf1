//! The reference VMM: a small KVM VMM whose guest dirties memory, migratable by this crate.
