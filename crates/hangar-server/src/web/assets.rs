//! The web console's files: `crates/hangar-server/web/`, embedded in the binary at build
//! time (a debug build reads them from disk, so a page edit shows on reload).
//!
//! Every file answers with an `ETag` (its SHA-256) and `Cache-Control: no-cache`: a
//! browser asks again each time and gets `304 Not Modified` while the file is unchanged,
//! so a new server never runs with an old page's scripts.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::Embed;

#[derive(Embed)]
#[folder = "web/"]
struct Files;

/// `GET /`: the console's one page.
pub(crate) async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /static/{*path}`: a file of the console (scripts, styles, the terminal widget).
pub(crate) async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

/// Whether `path` names a file inside the folder: relative, no `..`, no empty segment.
fn safe(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && path
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}

/// The media type of `path`, by its extension; the embedded guess for the rest.
fn media_type(path: &str, guessed: &str) -> String {
    let extension = path.rsplit_once('.').map_or("", |(_, ext)| ext);
    match extension.to_ascii_lowercase().as_str() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "woff2" => "font/woff2",
        "json" => "application/json",
        _ => guessed,
    }
    .to_owned()
}

/// The file at `path` of the folder, or 404; 304 when `If-None-Match` names its ETag.
fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(file) = safe(path).then(|| Files::get(path)).flatten() else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "not found\n",
        )
            .into_response();
    };
    let etag = format!("\"{}\"", hex::encode(file.metadata.sha256_hash()));
    let cache = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::ETAG,
            HeaderValue::from_str(&etag).expect("hex is a header value"),
        ),
    ];
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == etag));
    if unchanged {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    let media = media_type(path, file.metadata.mimetype());
    (
        cache,
        [(header::CONTENT_TYPE, media)],
        file.data.into_owned(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_folder_are_refused_and_types_follow_extensions() {
        for bad in [
            "",
            "../Cargo.toml",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            "./a",
            "a\\b",
        ] {
            assert!(!safe(bad), "{bad}");
        }
        assert!(safe("vendor/xterm/xterm.mjs"));
        assert_eq!(
            media_type("vendor/xterm/xterm.mjs", "?"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(media_type("app.JS", "?"), "text/javascript; charset=utf-8");
        assert_eq!(media_type("style.css", "?"), "text/css; charset=utf-8");
        assert_eq!(media_type("font.woff2", "?"), "font/woff2");
        assert_eq!(
            media_type("x.bin", "application/octet-stream"),
            "application/octet-stream"
        );
    }
}
