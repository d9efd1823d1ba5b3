//! The one-shot commands' progress bar: drawn on stderr when it is a terminal (the command
//! is run under a pseudo-terminal by `script`, skipped where `script` is missing), never
//! with stderr piped or with `--json`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

/// The ANSI sequence indicatif clears its line with.
const CLEAR_LINE: &str = "\u{1b}[2K";

fn args(state: &Path, source: &Path, json: bool) -> Vec<String> {
    let mut a = vec!["--state".to_string(), state.display().to_string()];
    if json {
        a.push("--json".into());
    }
    a.extend(
        ["checkpoint", "--db", "d", "--kind", "pages", "--source"]
            .iter()
            .map(|s| s.to_string()),
    );
    a.push(source.display().to_string());
    a
}

/// Runs `cairn ARGS` with a pseudo-terminal as its stdin, stdout and stderr; what the
/// terminal showed, or `None` without `script`.
fn under_terminal(args: &[String]) -> Option<String> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut line = quote(env!("CARGO_BIN_EXE_cairn"));
    for a in args {
        line.push(' ');
        line.push_str(&quote(a));
    }
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .output()
        .ok()?;
    assert!(out.status.success(), "{line} failed: {out:?}");
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_bar_is_drawn_on_a_terminal_and_cleared_and_never_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("pages.bin");
    let pages: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&source, pages).unwrap();

    // Piped stderr (what every other CLI test does): no bar, no escape sequence.
    let piped = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args(&dir.path().join("piped"), &source, false))
        .output()
        .unwrap();
    assert!(piped.status.success(), "{piped:?}");
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(!err.contains('\u{1b}'), "stderr: {err:?}");
    assert!(String::from_utf8_lossy(&piped.stdout).contains("published generation 1"));

    let Some(shown) = under_terminal(&args(&dir.path().join("tty"), &source, false)) else {
        eprintln!("skipped: no `script` to run the command under a pseudo-terminal");
        return;
    };
    assert!(shown.contains("checkpoint"), "terminal: {shown:?}");
    assert!(shown.contains(CLEAR_LINE), "terminal: {shown:?}");
    // The bar is cleared before the report is printed.
    let before = &shown[..shown.find("published generation 1").unwrap()];
    assert!(
        before.rfind(CLEAR_LINE) > before.rfind("checkpoint"),
        "terminal: {shown:?}"
    );

    // --json on a terminal: the JSON document alone.
    let json = under_terminal(&args(&dir.path().join("json"), &source, true)).unwrap();
    assert!(!json.contains('\u{1b}'), "terminal: {json:?}");
    assert!(json.trim_start().starts_with('{'), "terminal: {json:?}");
}
