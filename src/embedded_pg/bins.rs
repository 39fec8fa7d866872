//! Finding the PostgreSQL server binaries: [`find_bin_dir`] searches `PATH`
//! and `/usr/lib/postgresql/*/bin`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::Error;

/// Finds a directory containing both `initdb` and `pg_ctl`.
///
/// Looks in each `PATH` entry first, then in `/usr/lib/postgresql/*/bin` (Debian's
/// layout), highest numeric version first. For a `PATH` hit whose `initdb` is a symlink
/// (as `/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb`), the directory the
/// link resolves to is returned if it holds both programs too, so that all binaries
/// come from one installation.
///
/// # Errors
///
/// [`Error::BinariesNotFound`] if no such directory exists.
pub fn find_bin_dir() -> Result<PathBuf, Error> {
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for dir in path_dirs.into_iter().filter(|d| d.is_absolute()) {
        if has_pg_bins(&dir) {
            if let Some(real) = std::fs::canonicalize(dir.join("initdb"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                && has_pg_bins(&real)
            {
                return Ok(real);
            }
            return Ok(dir);
        }
    }
    versioned_bin_dirs(Path::new("/usr/lib/postgresql"))
        .into_iter()
        .find(|d| has_pg_bins(d))
        .ok_or(Error::BinariesNotFound)
}

/// `<root>/<version>/bin` for each numeric version directory under `root`, highest first.
pub(super) fn versioned_bin_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let key = parse_version(name.to_str()?)?;
            Some((key, e.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, p)| p).collect()
}

/// `"15"` -> `[15]`, `"9.6"` -> `[9, 6]`; anything else -> `None`.
fn parse_version(s: &str) -> Option<Vec<u32>> {
    s.split('.').map(|p| p.parse::<u32>().ok()).collect()
}

pub(super) fn has_pg_bins(dir: &Path) -> bool {
    is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl"))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_bin_dir() {
        let dir = find_bin_dir().unwrap();
        assert!(dir.join("initdb").is_file(), "{}", dir.display());
        assert!(dir.join("pg_ctl").is_file(), "{}", dir.display());
    }
}
