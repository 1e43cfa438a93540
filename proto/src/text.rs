//! What text may hold, on every side: no control characters in what a client or a worker sends
//! (a terminal would obey an ESC sequence in a cancel reason shown by `segtrain status`;
//! PostgreSQL cannot store NUL), and nothing raw reaches a terminal that the CLI prints.
//!
//! Two kinds of text: one line (names, paths, cancel reasons: no control character at all) and
//! several lines (notes and a rank's end reason, which carry a trainer's error output: line
//! feeds and tabs, nothing else).

use std::borrow::Cow;

/// Whether `c` is allowed in text of this kind.
fn allowed(c: char, multiline: bool) -> bool {
    !c.is_control() || (multiline && matches!(c, '\n' | '\t'))
}

/// The first character `s` may not hold, with its byte offset, if any.
pub fn forbidden_control(s: &str, multiline: bool) -> Option<(usize, char)> {
    s.char_indices().find(|(_, c)| !allowed(*c, multiline))
}

/// The refusal text for a field holding `s` that breaks the rule, naming the character and
/// where it is (`None` when `s` is fine).
pub fn control_refusal(s: &str, multiline: bool) -> Option<String> {
    forbidden_control(s, multiline).map(|(at, c)| {
        let allowed = if multiline {
            "control characters other than line feed and tab"
        } else {
            "control characters"
        };
        format!(
            "must not contain {allowed}; found {} at byte {at}",
            c.escape_unicode()
        )
    })
}

/// `s` with every character text of this kind may not hold replaced by U+FFFD: what a daemon
/// sends of a trainer's output, so that it is never refused for it.
pub fn scrub(s: &str, multiline: bool) -> String {
    s.chars()
        .map(|c| if allowed(c, multiline) { c } else { '\u{FFFD}' })
        .collect()
}

/// `s` as the CLI prints it: every control character but line feed and tab shown as `\u{…}`,
/// so nothing stored (by an older version, or by hand) can drive the terminal.
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    if forbidden_control(s, true).is_none() {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| {
                if allowed(c, true) {
                    c.to_string()
                } else {
                    c.escape_unicode().to_string()
                }
            })
            .collect(),
    )
}

/// JSON text (already encoded) as the CLI prints it: DEL and the C1 controls, which JSON allows
/// raw in a string, written as `\u00XX` escapes (JSON encoders escape the rest already).
pub fn json_safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| match c {
                '\u{7f}'..='\u{9f}' => format!("\\u{:04x}", u32::from(c)),
                c => c.to_string(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_refused_scrubbed_or_shown_escaped() {
        assert_eq!(forbidden_control("plain text", false), None);
        assert_eq!(forbidden_control("a\nb", false), Some((1, '\n')));
        assert_eq!(forbidden_control("a\nb\tc", true), None);
        assert_eq!(
            forbidden_control("\u{1b}[31mred", true),
            Some((0, '\u{1b}'))
        );
        // DEL and the C1 controls (U+009B is a one-character CSI on some terminals).
        assert!(forbidden_control("x\u{7f}", true).is_some());
        assert!(forbidden_control("x\u{9b}31m", true).is_some());
        let why = control_refusal("a\0b", false).expect("refused");
        assert!(why.contains("\\u{0}") && why.contains("byte 1"), "{why}");
        assert_eq!(scrub("a\u{1b}[0m\nb", true), "a\u{FFFD}[0m\nb");
        assert_eq!(scrub("a\nb", false), "a\u{FFFD}b");
        assert_eq!(terminal_safe("fine\n"), "fine\n");
        assert_eq!(terminal_safe("\u{1b}[2Jgone"), "\\u{1b}[2Jgone");
        assert_eq!(
            json_safe("{\"a\":\"x\u{9b}y\"}\n"),
            "{\"a\":\"x\\u009by\"}\n"
        );
    }
}
