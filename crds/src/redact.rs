//! URLs as they may be shown (status, logs, termination messages): without their userinfo.

/// `url` without its userinfo: `https://***@host/path` (a password never reaches the status).
pub fn userinfo(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map(|i| start + i)
        .unwrap_or(url.len());
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_only() {
        assert_eq!(userinfo("https://u:p@h.example/x@y"), "https://***@h.example/x@y");
        assert_eq!(userinfo("https://h.example/a?b=c@d"), "https://h.example/a?b=c@d");
        assert_eq!(userinfo("not a url"), "not a url");
    }
}
