//! What a new user sees first: `lmx` alone and `lmx --version`.

use crate::lmx;

#[test]
fn lmx_alone_prints_examples_and_succeeds() {
    let out = lmx(&[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["Try:", "lmx generate --prompt", "lmx chat", "lmx convert", "lmx lora", "lmx COMMAND --help"] {
        assert!(text.contains(needle), "`lmx` alone lacks {needle:?}:\n{text}");
    }
}

#[test]
fn version_names_the_commit_and_the_backend() {
    let out = lmx(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("lmx {} (commit ", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(text.contains("CPU"), "{text}");
}
