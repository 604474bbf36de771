//! Fuzz targets for the HTTP path and query parsing (`bucket_and_key`, `query_param`,
//! `level`, `percent_decode`). They run under plain `cargo test` for a bounded number of
//! inputs; `BOLERO_RANDOM_ITERATIONS=N` runs more, and `--nocapture` shows how many ran.

use super::{bucket_and_key, level, percent_decode, query_param};
use axum::http::Uri;
use mendkv_core::quorum::ConsistencyLevel;
use percent_encoding::{percent_encode, utf8_percent_encode, NON_ALPHANUMERIC};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Inputs per target in CI: enough to hit every branch, a fraction of a second each.
const CI_ITERATIONS: usize = 3000;
const BUCKET_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-";
const LEVELS: [ConsistencyLevel; 3] = [
    ConsistencyLevel::One,
    ConsistencyLevel::Quorum,
    ConsistencyLevel::All,
];

fn report(target: &str, inputs: &AtomicUsize) {
    eprintln!("{target}: {} inputs", inputs.load(Ordering::Relaxed));
}

/// Any request target hyper would accept, under any prefix, never panics the parsers, and
/// a decoded key never grows beyond its encoding.
#[test]
fn arbitrary_targets_never_panic() {
    let inputs = AtomicUsize::new(0);
    bolero::check!()
        .with_iterations(CI_ITERATIONS)
        .for_each(|bytes: &[u8]| {
            inputs.fetch_add(1, Ordering::Relaxed);
            let text = String::from_utf8_lossy(bytes);
            if let Ok(decoded) = percent_decode(&text) {
                assert!(decoded.len() <= text.len());
            }
            for target in [
                format!("/kv/{text}"),
                format!("/admin/local/{text}"),
                text.to_string(),
            ] {
                let Ok(uri) = target.parse::<Uri>() else {
                    continue;
                };
                for prefix in ["/kv/", "/admin/local/"] {
                    if let Ok((bucket, key)) = bucket_and_key(&uri, prefix) {
                        assert!(!bucket.is_empty() && bucket.len() <= 64);
                        assert!(!key.is_empty() && key.len() <= 1024);
                    }
                }
                for name in ["r", "w", "bucket", ""] {
                    let _ = query_param(&uri, name);
                    let _ = level(&uri, name, ConsistencyLevel::Quorum);
                }
            }
        });
    report("arbitrary_targets_never_panic", &inputs);
}

/// A bucket, an arbitrary key, a level and an arbitrary query value, percent-encoded the way
/// clients do, decode to exactly what was encoded.
#[test]
fn valid_encodings_round_trip() {
    let inputs = AtomicUsize::new(0);
    bolero::check!()
        .with_type::<(Vec<u8>, Vec<u8>, u8, String, bool)>()
        .with_iterations(CI_ITERATIONS)
        .for_each(|(bucket, key, level_index, value, uppercase_hex)| {
            inputs.fetch_add(1, Ordering::Relaxed);
            let mut bucket: String = bucket
                .iter()
                .take(64)
                .map(|b| BUCKET_ALPHABET[*b as usize % BUCKET_ALPHABET.len()] as char)
                .collect();
            if bucket.is_empty() {
                bucket.push('b');
            }
            let mut key = key.clone();
            key.truncate(1024);
            if key.is_empty() {
                key.push(0);
            }
            let chosen = LEVELS[*level_index as usize % LEVELS.len()];
            let mut encoded_key = percent_encode(&key, NON_ALPHANUMERIC).to_string();
            if !*uppercase_hex {
                // Hex digits are case-insensitive in escapes.
                encoded_key = encoded_key.to_ascii_lowercase();
                key = key
                    .iter()
                    .map(|b| {
                        if b.is_ascii_uppercase() {
                            b.to_ascii_lowercase()
                        } else {
                            *b
                        }
                    })
                    .collect();
            }
            let encoded_value = utf8_percent_encode(value, NON_ALPHANUMERIC);
            let target = format!(
                "/kv/{bucket}/{encoded_key}?x=1&r={}&v={encoded_value}&r=all",
                chosen.as_str().to_ascii_uppercase()
            );
            let uri: Uri = target
                .parse()
                .expect("a percent-encoded target is a valid URI");
            let (parsed_bucket, parsed_key) =
                bucket_and_key(&uri, "/kv/").unwrap_or_else(|_| panic!("refused {target}"));
            assert_eq!(parsed_bucket, bucket);
            assert_eq!(parsed_key, key);
            // The first occurrence of a parameter wins.
            assert_eq!(level(&uri, "r", ConsistencyLevel::One).ok(), Some(chosen));
            assert_eq!(level(&uri, "w", chosen).ok(), Some(chosen));
            assert_eq!(
                query_param(&uri, "v").ok().flatten().as_deref(),
                Some(value.as_str())
            );
        });
    report("valid_encodings_round_trip", &inputs);
}

/// Invalid escapes are refused wherever they are, never taken as literal bytes.
#[test]
fn invalid_escapes_are_refused() {
    for key in ["%zz", "%", "%4", "a%2", "ok%g1", "%%41", "x%4%41"] {
        let uri: Uri = format!("/kv/b/{key}").parse().unwrap();
        assert!(bucket_and_key(&uri, "/kv/").is_err(), "{key}");
        let uri: Uri = format!("/kv/b{key}/k").parse().unwrap();
        assert!(bucket_and_key(&uri, "/kv/").is_err(), "bucket {key}");
        let uri: Uri = format!("/kv/b/k?r={key}").parse().unwrap();
        assert!(query_param(&uri, "r").is_err(), "query {key}");
    }
    assert_eq!(percent_decode("%41%2f%2F+").unwrap(), b"A//+");
}
