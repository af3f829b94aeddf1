//! A typed, synchronous QMP client for QEMU (work in progress, see the qmp issue).
