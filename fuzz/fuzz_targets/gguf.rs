#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lmx_fuzz::gguf(data));
