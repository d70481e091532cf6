//! The admin API's bearer token: read from `admin.token_file`, or made (32 random bytes, hex,
//! mode 0600) when the file does not exist, so a fresh install has a secret nobody chose.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use tracing::info;

/// Why the admin token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{}: the admin token must be at least 16 characters", .0.display())]
    TooShort(std::path::PathBuf),
    #[error("{}: cannot read the admin token: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot write the admin token: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("no randomness for a token: {0}")]
    Random(getrandom::Error),
}

/// Reads the admin token, or writes a new random one (mode 0600) when the file does not
/// exist yet, so a fresh install has a secret nobody chose and nothing is shipped.
pub fn load_or_create_token(path: &Path) -> Result<String, TokenError> {
    let write_err = |source| TokenError::Write {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_string();
            if token.len() < 16 {
                return Err(TokenError::TooShort(path.to_path_buf()));
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw).map_err(TokenError::Random)?;
            let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(write_err)?;
            file.write_all(token.as_bytes())
                .and_then(|_| file.write_all(b"\n"))
                .map_err(write_err)?;
            info!(file = %path.display(), "wrote a new random secret (mode 0600)");
            Ok(token)
        }
        Err(source) => Err(TokenError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_token_once_and_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("ipgate-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.token");
        let _ = std::fs::remove_file(&path);
        let first = load_or_create_token(&path).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(load_or_create_token(&path).unwrap(), first);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
