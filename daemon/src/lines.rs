//! Reads a trainer's stdout line by line with a bound on the line length: a trainer (or a
//! library it loads) that prints a 10 MB line, or no newline at all, costs the daemon at most
//! `max` bytes of memory, and the rest of the output is still read.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// One line of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Text(String),
    /// Longer than the limit: skipped to its end; its length in bytes.
    TooLong(usize),
    NotUtf8,
}

pub struct LineReader<R> {
    inner: R,
    max: usize,
    buf: Vec<u8>,
    /// Bytes of the current line skipped so far (it is too long).
    skipped: usize,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> LineReader<R> {
        LineReader {
            inner,
            max,
            buf: Vec::new(),
            skipped: 0,
        }
    }

    /// The next line (without its newline), or `None` at the end of the output. A last line
    /// without a newline is returned too.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            let chunk = self.inner.fill_buf().await?;
            if chunk.is_empty() {
                if self.buf.is_empty() && self.skipped == 0 {
                    return Ok(None);
                }
                return Ok(Some(self.finish()));
            }
            let (part, used, end) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..i], i + 1, true),
                None => (chunk, chunk.len(), false),
            };
            if self.skipped > 0 || self.buf.len() + part.len() > self.max {
                self.skipped += self.buf.len() + part.len();
                self.buf = Vec::new();
            } else {
                self.buf.extend_from_slice(part);
            }
            self.inner.consume(used);
            if end {
                return Ok(Some(self.finish()));
            }
        }
    }

    fn finish(&mut self) -> Line {
        if self.skipped > 0 {
            let n = self.skipped;
            self.skipped = 0;
            return Line::TooLong(n);
        }
        let bytes = std::mem::take(&mut self.buf);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(&bytes).to_vec();
        match String::from_utf8(bytes) {
            Ok(s) => Line::Text(s),
            Err(_) => Line::NotUtf8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn all(input: &[u8], max: usize, chunk: usize) -> Vec<Line> {
        // A reader that hands out at most `chunk` bytes per fill, to cross chunk boundaries.
        let reader = tokio::io::BufReader::with_capacity(chunk.max(1), input);
        let mut r = LineReader::new(reader, max);
        let mut out = Vec::new();
        while let Some(l) = r.next_line().await.expect("read") {
            out.push(l);
        }
        out
    }

    #[tokio::test]
    async fn long_lines_are_skipped_and_the_rest_is_read() {
        let text = |s: &str| Line::Text(s.to_string());
        let input = format!("short\n{}\nafter\nlast", "x".repeat(100));
        for chunk in [1, 3, 7, 64, 4096] {
            assert_eq!(
                all(input.as_bytes(), 10, chunk).await,
                [
                    text("short"),
                    Line::TooLong(100),
                    text("after"),
                    text("last")
                ],
                "chunk {chunk}"
            );
        }
        assert_eq!(all(b"", 10, 8).await, []);
        assert_eq!(all(b"\n\n", 10, 8).await, [text(""), text("")]);
        assert_eq!(all(b"a\r\n\xff\n", 10, 8).await, [text("a"), Line::NotUtf8]);
        // Exactly the limit is fine; one more is too long.
        assert_eq!(all(b"0123456789\n", 10, 4).await, [text("0123456789")]);
        assert_eq!(all(b"0123456789a\n", 10, 4).await, [Line::TooLong(11)]);
    }
}
