//! The daemon reads whatever a trainer prints: its line reader and parser never panic on
//! arbitrary input, and every line that parses converts to what the coordinator gets (property
//! tests; `PROPTEST_CASES` raises the count).

use proptest::prelude::*;
use segtrain_daemon::lines::{Line, LineReader};
use segtrain_daemon::trainer_process::parse_line;
use segtrain_wire::{TrainerLine, KINDS};

/// Lines that look like events: a known or unknown kind, with fields of any JSON type.
fn event_like() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        proptest::sample::select(KINDS.to_vec()).prop_map(str::to_string),
        "[a-z_]{0,12}",
    ];
    let value = prop_oneof![
        Just("null".to_string()),
        Just("\"NaN\"".to_string()),
        Just("\"inf\"".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        "\"[ -~]{0,10}\"",
        Just("{\"loss\":1.5,\"x\":null}".to_string()),
        Just("[1,null,\"NaN\"]".to_string()),
        Just("[{\"iteration\":1,\"uri\":\"/c\",\"reason\":\"r\"}]".to_string()),
    ];
    let field = proptest::sample::select(vec![
        "iteration",
        "values",
        "miou",
        "aacc",
        "loss",
        "class_iou",
        "uri",
        "bytes",
        "sha256",
        "metrics",
        "deleted",
        "skipped",
        "class",
        "reason",
        "tcp_address",
        "nccl_unique_id",
        "backend",
        "detail",
        "start_iteration",
        "max_iters",
        "train_images",
        "val_images",
        "device",
        "parameters",
        "images",
        "best_miou",
    ]);
    (kind, proptest::collection::vec((field, value), 0..8)).prop_map(|(kind, fields)| {
        let mut s = format!("{{\"event\":\"{kind}\"");
        for (f, v) in fields {
            s.push_str(&format!(",\"{f}\":{v}"));
        }
        s.push('}');
        s
    })
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics_the_parser(line in any::<String>()) {
        let _ = parse_line(&line, "job", 1);
    }

    #[test]
    fn event_like_lines_parse_or_say_why(line in event_like()) {
        match parse_line(&line, "job", 3) {
            Ok(_) => prop_assert!(TrainerLine::parse(&line).is_ok()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn arbitrary_bytes_in_arbitrary_chunks_are_read_as_bounded_lines(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        chunk in 1usize..64,
        max in 1usize..256,
    ) {
        let lines = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(async {
                let reader = tokio::io::BufReader::with_capacity(chunk, bytes.as_slice());
                let mut r = LineReader::new(reader, max);
                let mut out = Vec::new();
                while let Some(l) = r.next_line().await.expect("in-memory reads do not fail") {
                    out.push(l);
                }
                out
            });
        // As many lines as newlines (plus an unterminated last one); none over the bound.
        let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
        let tail = usize::from(bytes.last().is_some_and(|&b| b != b'\n'));
        prop_assert_eq!(lines.len(), newlines + tail);
        for l in &lines {
            match l {
                Line::Text(t) => {
                    prop_assert!(t.len() <= max);
                    let _ = parse_line(t, "job", 1);
                }
                Line::TooLong(n) => prop_assert!(*n > max),
                Line::NotUtf8 => {}
            }
        }
    }
}
