//! The gateway's own pages (the challenge, the security overview, the console) carry their
//! script and style inline and name them in their Content-Security-Policy by hash, so that
//! nothing injected could run.

use base64::Engine;

/// `sha256-BASE64` of the inline element of `page` that opens with `open` (`<script>` or
/// `<style>`), as a CSP source. The element must hold no template variable.
pub fn inline_hash(page: &str, open: &str) -> String {
    let close = open.replace('<', "</");
    let body = page
        .split_once(open)
        .and_then(|(_, rest)| rest.split_once(close.as_str()))
        .map_or("", |(body, _)| body);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_hash_is_of_the_elements_body_only() {
        let page = "<style>a{}</style><script>x()</script>";
        // echo -n 'x()' | openssl dgst -sha256 -binary | base64
        assert_eq!(
            super::inline_hash(page, "<script>"),
            "sha256-D6IGS8VMvCoyaR/l0h9tERrBTATY01CoPS7l6xDv0kI="
        );
        assert_ne!(
            super::inline_hash(page, "<style>"),
            super::inline_hash(page, "<script>")
        );
    }
}
