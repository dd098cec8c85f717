//! Sending a file over HTTP with single-range resumes (`Range: bytes=N-` or `bytes=N-M`):
//! the server's image blobs and an agent's template files both go out this way.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

/// Bytes read from disk per chunk sent.
const CHUNK: usize = 256 * 1024;

/// A range that starts at or past the end of the file (answer 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PastEnd {
    pub size: u64,
    pub first: u64,
}

/// The answer sending `file` (`size` bytes): 200 with the whole file, or 206 with
/// `Content-Range` for a single `bytes=FIRST-[LAST]` range in `headers`; other ranges are
/// ignored (200). A range starting past the end is [`PastEnd`].
pub async fn send_file(
    mut file: tokio::fs::File,
    size: u64,
    headers: &HeaderMap,
) -> Result<Response, SendError> {
    let range = headers
        .get(header::RANGE)
        .and_then(|value| value.to_str().ok())
        .and_then(byte_range);
    let (status, first, end) = match range {
        None => (StatusCode::OK, 0, size),
        Some((first, _)) if first >= size => {
            return Err(SendError::PastEnd(PastEnd { size, first }));
        }
        Some((first, last)) => {
            let end = last.map_or(size, |last| last.saturating_add(1).min(size));
            (StatusCode::PARTIAL_CONTENT, first, end)
        }
    };
    if first > 0 {
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(first))
            .await
            .map_err(SendError::Io)?;
    }
    let stream = futures::stream::unfold((file, end - first), |(mut file, left)| async move {
        use tokio::io::AsyncReadExt;
        if left == 0 {
            return None;
        }
        let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        let mut buf = vec![0u8; want];
        match file.read(&mut buf).await {
            Ok(0) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the blob's file ended early",
                )),
                (file, 0),
            )),
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(axum::body::Bytes::from(buf)), (file, left - n as u64)))
            }
            Err(err) => Some((Err(err), (file, 0))),
        }
    });
    let mut response = Response::new(axum::body::Body::from_stream(stream));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(value) = HeaderValue::from_str(&(end - first).to_string()) {
        headers.insert(header::CONTENT_LENGTH, value);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {first}-{}/{size}", end.saturating_sub(1));
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(header::CONTENT_RANGE, value);
        }
    }
    Ok(response)
}

/// Why a file was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the file has {} bytes; the range starts at {}", .0.size, .0.first)]
    PastEnd(PastEnd),
    #[error("cannot seek in the file")]
    Io(#[source] std::io::Error),
}

/// The first byte and (inclusive) last byte of a single `bytes=FIRST-[LAST]` range;
/// `None` for anything else (several ranges, suffix ranges, other units), which is then
/// ignored.
pub fn byte_range(value: &str) -> Option<(u64, Option<u64>)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let last = last.trim();
    if last.is_empty() {
        return Some((first, None));
    }
    let last: u64 = last.parse().ok()?;
    (last >= first).then_some((first, Some(last)))
}

#[cfg(test)]
mod range_tests {
    use super::byte_range;

    #[test]
    fn single_byte_ranges_are_read_and_others_ignored() {
        assert_eq!(byte_range("bytes=100-"), Some((100, None)));
        assert_eq!(byte_range("bytes=0-9"), Some((0, Some(9))));
        assert_eq!(byte_range("bytes=-500"), None);
        assert_eq!(byte_range("bytes=0-1,5-6"), None);
        assert_eq!(byte_range("bytes=9-3"), None);
        assert_eq!(byte_range("items=0-"), None);
    }
}
