//! Whole ownership journal files (see `ferry_fuzz::check_journal`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: ferry_fuzz::CappedAlloc = ferry_fuzz::CappedAlloc;

fuzz_target!(|input: &[u8]| {
    ferry_fuzz::check_journal(input);
});
