#![no_main]
//! See `protocol_fuzz::ferma_json` for what this target feeds and which properties it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| protocol_fuzz::ferma_json(data));
