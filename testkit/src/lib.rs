//! Test fixtures for Ninja.
