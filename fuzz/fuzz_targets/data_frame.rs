//! Memory and disk frame headers and device-state blobs, with limits taken from the input (see `ferry_fuzz::check_data_frame`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: ferry_fuzz::CappedAlloc = ferry_fuzz::CappedAlloc;

fuzz_target!(|input: &[u8]| {
    ferry_fuzz::check_data_frame(input);
});
