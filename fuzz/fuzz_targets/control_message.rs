//! Framed control messages of every type on ferry's control channels, picked by the first byte (see `ferry_fuzz::check_control_message`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: ferry_fuzz::CappedAlloc = ferry_fuzz::CappedAlloc;

fuzz_target!(|input: &[u8]| {
    ferry_fuzz::check_control_message(input);
});
