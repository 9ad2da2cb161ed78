//! Text from outside (a FHIR server's error body, an OperationOutcome's diagnostics) made safe
//! for where it is shown: one line for human logs and records, no escape sequences for a
//! terminal, no mentions or links for a Slack webhook.
//!
//! Pure functions over strings, no IO, no imports from the crate: callers apply them at the
//! point where server text enters a log line, a message or a payload.

/// `text` on one line of at most `max_chars` characters: line breaks become spaces and other
/// control characters (ANSI escapes among them) are dropped, so server text can neither forge
/// a log line nor drive a terminal. A cut is marked with `…`.
pub fn one_line(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 4));
    let mut kept = 0;
    let mut last_space = false;
    for c in text.chars() {
        let c = match c {
            '\n' | '\r' | '\t' => ' ',
            c if c.is_control() || is_bidi_control(c) => continue,
            c => c,
        };
        if c == ' ' && last_space {
            continue;
        }
        if kept == max_chars {
            out.push('…');
            return out.trim().to_string();
        }
        last_space = c == ' ';
        out.push(c);
        kept += 1;
    }
    out.trim().to_string()
}

/// `text` for a terminal: control characters other than newline and tab removed (ESC starts
/// every ANSI sequence, so none survives).
pub fn for_terminal(text: &str) -> String {
    text.chars()
        .filter(|c| *c == '\n' || *c == '\t' || !(c.is_control() || is_bidi_control(*c)))
        .collect()
}

/// `text` for a Slack message: `&`, `<` and `>` escaped as Slack asks, so that `<!channel>`,
/// `<@U123>` or `<https://evil|click here>` in server text stay literal text.
pub fn for_slack(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// Unicode bidirectional controls, which can make a terminal or page show text in another order
/// than it is.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_flattens_strips_and_cuts() {
        let cases = [
            ("plain", 10, "plain"),
            ("a\nFAKE log line\r\n", 40, "a FAKE log line"),
            ("\u{1b}[31mred\u{1b}[0m", 40, "[31mred[0m"),
            ("abcdef", 3, "abc…"),
            ("  spaced   out  ", 40, "spaced out"),
            ("rtl\u{202e}txt", 40, "rtltxt"),
        ];
        for (input, max, expected) in cases {
            assert_eq!(one_line(input, max), expected, "{input:?}");
        }
    }

    #[test]
    fn terminal_text_keeps_lines_but_no_escapes() {
        assert_eq!(
            for_terminal("a\n\u{1b}]0;title\u{7}b\tc"),
            "a\n]0;titleb\tc"
        );
    }

    #[test]
    fn slack_text_cannot_mention_or_link() {
        assert_eq!(
            for_slack("<!channel> see <https://evil.example|docs> & more"),
            "&lt;!channel&gt; see &lt;https://evil.example|docs&gt; &amp; more"
        );
    }
}
