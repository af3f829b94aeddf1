//! Pre-copy live migration engine for VMMs that own their guest memory (work in progress).
