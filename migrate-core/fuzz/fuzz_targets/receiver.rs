//! Feeds arbitrary bytes to the receiver: as a memory stream into a small two-region guest,
//! and as a control message payload. Neither may panic or write outside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = migrate_core::pages::fuzz_memory_stream(data);
    let _ = migrate_core::codec::decode(data);
    let _ = migrate_core::codec::read_message(&mut &data[..]);
});
