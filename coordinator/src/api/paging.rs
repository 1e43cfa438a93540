//! Paging of the list calls (ListJobs, ListWorkers, ListCheckpoints, ListAttempts): a page size
//! (0: the call's default) and the token the previous page returned, which names the last item
//! it held. Each call asks the store for one item more than the page, which says whether
//! another page exists.

use std::str::FromStr;
use tonic::Status;

/// ListWorkers, ListCheckpoints and ListAttempts: a page of 0 means this many.
pub(super) const DEFAULT_LIST: u32 = 1000;
/// ... and at most this many.
pub(super) const MAX_LIST: u32 = 10_000;

/// The page size asked for, checked: 0 is `default`, else 1..=`max`.
pub(super) fn size(n: u32, default: u32, max: u32) -> Result<u32, Status> {
    match n {
        0 => Ok(default),
        n if n <= max => Ok(n),
        n => Err(Status::invalid_argument(format!(
            "page_size: must be 0 (default {default}) or 1..={max}, got {n}"
        ))),
    }
}

/// The item a page token names (`None`: the first page).
pub(super) fn token<T: FromStr>(t: &str, call: &str) -> Result<Option<T>, Status> {
    if t.is_empty() {
        return Ok(None);
    }
    t.parse().map(Some).map_err(|_| {
        Status::invalid_argument(format!(
            "page_token: not a token from a previous {call} response, got {t:?}"
        ))
    })
}

/// Cuts `items` (read with one more than `size`) to the page, and the token of the next page:
/// the key of its last item, or empty when there is none.
pub(super) fn next<T, K: ToString>(items: &mut Vec<T>, size: u32, key: impl Fn(&T) -> K) -> String {
    let more = items.len() > size as usize;
    items.truncate(size as usize);
    match (more, items.last()) {
        (true, Some(last)) => key(last).to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        assert_eq!(size(0, 50, 1000).expect("default"), 50);
        assert_eq!(size(1000, 50, 1000).expect("max"), 1000);
        let e = size(1001, 50, 1000).unwrap_err();
        assert!(e
            .message()
            .starts_with("page_size: must be 0 (default 50) or 1..=1000"));
        assert_eq!(token::<u32>("", "ListAttempts").expect("first"), None);
        assert_eq!(token::<u32>("7", "ListAttempts").expect("next"), Some(7));
        assert!(token::<u32>("x", "ListAttempts").is_err());
        let mut items = vec![1, 2, 3];
        assert_eq!(next(&mut items, 2, |i| *i), "2");
        assert_eq!(items, [1, 2]);
        let mut items = vec![1, 2];
        assert_eq!(next(&mut items, 2, |i| *i), "");
    }
}
