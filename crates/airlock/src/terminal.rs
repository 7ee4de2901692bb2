//! Vendor-supplied text made safe to print: no byte of it can act on the terminal.
//!
//! Whatever the control plane serves (scripts, names, tags, reasons) and whatever an operation
//! printed may carry terminal sequences; a `\r` plus `ESC[2K` once hid a command from the
//! customer's review. Every such string goes through here before it reaches a terminal:
//! control characters (C0, DEL, C1) and invisible or reordering format characters (zero-width
//! spaces, bidirectional overrides) are shown escaped, as `\u{…}`, so they can be seen.

use std::borrow::Cow;

/// One line: every control character is escaped, newlines and tabs too.
pub(crate) fn line(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// Several lines (a script): newlines and tabs stay, every other control character is escaped.
pub(crate) fn lines(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

/// JSON text as serde_json writes it, with what it leaves raw inside strings (DEL, C1, format
/// characters) written as `\uXXXX` escapes: the same JSON, safe on a terminal.
pub(crate) fn json(text: &str) -> Cow<'_, str> {
    // Whitespace between tokens is the JSON's own; inside strings serde_json escapes it.
    let raw = |c: char| hides(c) && !matches!(c, '\n' | '\t' | '\r' | ' ');
    if !text.chars().any(raw) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if raw(c) {
            // Every character `hides` names is in the Basic Multilingual Plane.
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Prints a value as pretty JSON, safe on a terminal and still the same JSON.
pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", json(&serde_json::to_string_pretty(value)?));
    Ok(())
}

/// Writes an operation's output to stdout: as it is into a pipe or a file, escaped ([`output`])
/// on a terminal.
pub(crate) fn write_output(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::{IsTerminal, Write};
    let mut stdout = std::io::stdout().lock();
    if stdout.is_terminal() {
        stdout.write_all(output(bytes).as_bytes())?;
    } else {
        stdout.write_all(bytes)?;
    }
    stdout.flush()
}

/// Output bytes for a terminal: valid UTF-8 is shown with [`lines`]; anything else as escaped
/// bytes, so nothing reaches the terminal raw.
pub(crate) fn output(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => lines(text).into_owned(),
        Err(_) => bytes.escape_ascii().to_string(),
    }
}

fn escape(text: &str, keep_newlines: bool) -> Cow<'_, str> {
    let kept = |c: char| keep_newlines && matches!(c, '\n' | '\t');
    if !text.chars().any(|c| hides(c) && !kept(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hides(c) && !kept(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A character that acts on a terminal or cannot be seen: control characters, zero-width
/// characters, bidirectional controls and the byte-order mark.
fn hides(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_that_hides_a_command_is_shown_not_obeyed() {
        let script = "echo harmless\r\u{1b}[2Krm -rf /\n";
        assert_eq!(lines(script), "echo harmless\\u{d}\\u{1b}[2Krm -rf /\n");
        assert_eq!(line("a\nb\tc"), "a\\u{a}b\\u{9}c");
        assert_eq!(line("output:s\u{200b}ecret"), "output:s\\u{200b}ecret");
        assert_eq!(line("\u{202e}txt.exe"), "\\u{202e}txt.exe");
        assert_eq!(line("\u{9b}31m"), "\\u{9b}31m");
        assert!(matches!(line("plain text"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_stays_json_and_loses_its_raw_sequences() {
        let value = serde_json::json!({ "script": "a\u{7f}\u{9b}b\u{202e}", "n": 1 });
        for text in [serde_json::to_string(&value).unwrap(), serde_json::to_string_pretty(&value).unwrap()] {
            let safe = json(&text);
            assert!(!safe.chars().any(|c| hides(c) && c != '\n'), "{safe}");
            assert_eq!(serde_json::from_str::<serde_json::Value>(&safe).unwrap(), value);
        }
    }

    #[test]
    fn output_that_is_not_text_is_shown_as_escaped_bytes() {
        assert_eq!(output(b"ok\n"), "ok\n");
        assert_eq!(output(b"\xff\x1b[2K"), "\\xff\\x1b[2K");
    }
}
