//! A stand-in for Google Cloud Storage's XML API, GET only: `GET /<bucket>/<object>` answers
//! with the object (and the ETag and Last-Modified headers `object_store` requires) or 404.
//! Daemons reach it through `object_store`'s own settings, in their environment
//! ([`FakeGcs::env`]): the real gs:// code path, without a network.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct FakeGcs {
    port: u16,
    served: Arc<AtomicUsize>,
}

/// `%2F` and friends back to bytes.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeGcs {
    /// Serves `objects` ("bucket/path" → bytes) on a free port of 127.0.0.1 until the process
    /// ends.
    pub fn start(objects: HashMap<String, Vec<u8>>) -> FakeGcs {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake GCS");
        let port = listener.local_addr().expect("address").port();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut reader = BufReader::new(&conn);
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    continue;
                }
                // Skip the headers.
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let key = percent_decode(path.trim_start_matches('/'));
                let mut out = &conn;
                let _ = match objects.get(&key) {
                    Some(body) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        write!(
                            out,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"1\"\r\n\
                             Last-Modified: Tue, 01 Dec 2026 00:00:00 GMT\r\n\
                             Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .and_then(|_| out.write_all(body))
                    }
                    None => write!(
                        out,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    ),
                };
            }
        });
        FakeGcs { port, served }
    }

    /// The environment that points `object_store`'s GCS client here (no credentials, plain
    /// HTTP).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "GOOGLE_BASE_URL".into(),
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("GOOGLE_SKIP_SIGNATURE".into(), "true".into()),
            ("GOOGLE_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    /// Objects served so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}
