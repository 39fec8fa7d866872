//! The synchronous file-system part of a start ([`prepare`]): the cluster,
//! socket and log paths, the checks on them, the user the server runs as,
//! and the directories' owners and modes.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::bins::{find_bin_dir, has_pg_bins};
use super::{DEFAULT_PORT, Error, POSTGRES_USER, RunAs, io_ctx};

/// Longest Unix socket path (`sizeof(sun_path) - 1` on Linux).
const MAX_SOCKET_PATH: usize = 107;

/// What [`prepare`] found and made.
pub(super) struct Prepared {
    pub(super) base_dir: PathBuf,
    pub(super) data_dir: PathBuf,
    pub(super) bin_dir: PathBuf,
    pub(super) socket_dir: PathBuf,
    pub(super) socket_dir_is_tmp: bool,
    pub(super) log_file: PathBuf,
    pub(super) run_as: RunAs,
    pub(super) needs_initdb: bool,
}

/// The synchronous file system part of start: directories, ownership, binaries.
pub(super) fn prepare(dir: &Path) -> Result<Prepared, Error> {
    std::fs::create_dir_all(dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
    let base_dir =
        std::fs::canonicalize(dir).map_err(io_ctx(format!("resolving {}", dir.display())))?;
    check_path_chars(&base_dir)?;
    let run_as = resolve_run_as()?;
    if run_as.switch {
        check_searchable(&base_dir, run_as)?;
    }

    let data_dir = base_dir.join("pgdata");
    let version_file = data_dir.join("PG_VERSION");
    let needs_initdb = !version_file.exists();
    let bin_dir = if needs_initdb {
        if data_dir.exists() {
            let empty = std::fs::read_dir(&data_dir)
                .map_err(io_ctx(format!("reading {}", data_dir.display())))?
                .next()
                .is_none();
            if !empty {
                return Err(Error::InvalidDir {
                    path: data_dir,
                    reason: "it is not empty but has no PG_VERSION, so it is not a \
                             PostgreSQL cluster; move it away or remove it"
                        .into(),
                });
            }
        }
        find_bin_dir()?
    } else {
        let major = std::fs::read_to_string(&version_file)
            .map_err(io_ctx(format!("reading {}", version_file.display())))?;
        let versioned = Path::new("/usr/lib/postgresql")
            .join(major.trim())
            .join("bin");
        if !major.trim().is_empty() && has_pg_bins(&versioned) {
            versioned
        } else {
            find_bin_dir()?
        }
    };

    let (socket_dir, socket_dir_is_tmp) = choose_socket_dir(&base_dir, DEFAULT_PORT);
    if socket_dir_is_tmp {
        make_tmp_socket_dir(&socket_dir, run_as)?;
    } else {
        make_private_dir(&socket_dir, run_as)?;
    }

    let log_file = base_dir.join("postgres.log");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_file)
        .map_err(io_ctx(format!("creating {}", log_file.display())))?;
    if run_as.switch {
        chown(&log_file, run_as)?;
    }

    Ok(Prepared {
        base_dir,
        data_dir,
        bin_dir,
        socket_dir,
        socket_dir_is_tmp,
        log_file,
        run_as,
        needs_initdb,
    })
}

/// pg_ctl puts the data directory and log file in double quotes in a /bin/sh command
/// line, and URLs need UTF-8: refuse paths that would break either.
fn check_path_chars(path: &Path) -> Result<(), Error> {
    let Some(s) = path.to_str() else {
        return Err(Error::InvalidDir {
            path: path.to_path_buf(),
            reason: "the path is not valid UTF-8".into(),
        });
    };
    if let Some(c) = s
        .chars()
        .find(|c| matches!(c, '"' | '\\' | '$' | '`') || c.is_control())
    {
        return Err(Error::InvalidDir {
            path: path.to_path_buf(),
            reason: format!("the path contains {c:?}, which pg_ctl cannot handle"),
        });
    }
    Ok(())
}

/// Root: the `postgres` user. Otherwise: the current user.
fn resolve_run_as() -> Result<RunAs, Error> {
    // SAFETY: geteuid/getegid have no preconditions and cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid != 0 {
        return Ok(RunAs {
            uid: euid,
            gid: egid,
            switch: false,
        });
    }
    let (uid, gid) = lookup_user(POSTGRES_USER)?.ok_or(Error::NoPostgresUser)?;
    if uid == 0 {
        return Err(Error::NoPostgresUser);
    }
    Ok(RunAs {
        uid,
        gid,
        switch: true,
    })
}

/// uid and gid of user `name`, thread-safely (`getpwnam_r`).
fn lookup_user(name: &str) -> Result<Option<(u32, u32)>, Error> {
    let cname = CString::new(name).map_err(|e| Error::Io {
        context: format!("looking up user {name:?}"),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: an all-zero passwd (integers and null pointers) is a valid value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the duration of the call and `buf.len()`
        // is the size of `buf`; `pwd`'s strings point into `buf`, which we do not read.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &raw mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &raw mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(Error::Io {
                context: format!("looking up user {name:?}"),
                source: io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some((pwd.pw_uid, pwd.pw_gid)));
    }
}

/// Every directory from `/` down to `dir` must be searchable by `run_as` (whose
/// children run with no supplementary groups: std drops them when switching from root).
fn check_searchable(dir: &Path, run_as: RunAs) -> Result<(), Error> {
    for ancestor in dir.ancestors() {
        let meta = std::fs::metadata(ancestor)
            .map_err(io_ctx(format!("inspecting {}", ancestor.display())))?;
        let mode = meta.mode();
        let searchable = if meta.uid() == run_as.uid {
            mode & 0o100 != 0
        } else if meta.gid() == run_as.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            return Err(Error::InvalidDir {
                path: ancestor.to_path_buf(),
                reason: format!(
                    "it is not searchable by the `postgres` user (uid {}), which runs the \
                     embedded PostgreSQL server because sked runs as root; use a data \
                     directory that user can reach (e.g. under /var/lib or /tmp), or set \
                     DATABASE_URL",
                    run_as.uid
                ),
            });
        }
    }
    Ok(())
}

/// `<base>/run`, or `/tmp/sked-pg-<hash>` if that is too long for a socket path or
/// not expressible unquoted in `unix_socket_directories`. The bool says "fallback".
fn choose_socket_dir(base: &Path, port: u16) -> (PathBuf, bool) {
    let run = base.join("run");
    let socket_path_len = run.as_os_str().len() + format!("/.s.PGSQL.{port}").len();
    let awkward = run
        .to_string_lossy()
        .chars()
        .any(|c| matches!(c, ',' | '"' | '\\' | '\'') || c.is_whitespace());
    if socket_path_len <= MAX_SOCKET_PATH && !awkward {
        (run, false)
    } else {
        let hash = fnv1a64(base.as_os_str().as_encoded_bytes());
        (PathBuf::from(format!("/tmp/sked-pg-{hash:016x}")), true)
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Creates `dir` (mode 0700) if missing, and gives it to `run_as`.
pub(super) fn make_private_dir(dir: &Path, run_as: RunAs) -> Result<(), Error> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(io_ctx(format!("creating {}", dir.display()))(e)),
    }
    if run_as.switch {
        chown(dir, run_as)?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_ctx(format!("setting the mode of {}", dir.display())))
}

/// Like [`make_private_dir`] in world-writable /tmp: an existing entry must be a real
/// directory (not a symlink) already owned by `run_as`.
fn make_tmp_socket_dir(dir: &Path, run_as: RunAs) -> Result<(), Error> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            if run_as.switch {
                chown(dir, run_as)?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(dir)
                .map_err(io_ctx(format!("inspecting {}", dir.display())))?;
            if !meta.file_type().is_dir() || meta.uid() != run_as.uid {
                return Err(Error::InvalidDir {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "the socket directory exists but is not a directory owned by uid {}; \
                         remove it",
                        run_as.uid
                    ),
                });
            }
        }
        Err(e) => return Err(io_ctx(format!("creating {}", dir.display()))(e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_ctx(format!("setting the mode of {}", dir.display())))
}

fn chown(path: &Path, run_as: RunAs) -> Result<(), Error> {
    std::os::unix::fs::chown(path, Some(run_as.uid), Some(run_as.gid)).map_err(io_ctx(format!(
        "giving {} to uid {}",
        path.display(),
        run_as.uid
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_or_awkward_dirs_use_tmp_socket_dir() {
        let short = Path::new("/var/lib/sked");
        assert_eq!(
            choose_socket_dir(short, 5432),
            (PathBuf::from("/var/lib/sked/run"), false)
        );
        let long = PathBuf::from(format!("/{}", "x".repeat(100)));
        let (dir, tmp) = choose_socket_dir(&long, 5432);
        assert!(tmp);
        assert!(dir.starts_with("/tmp"), "{}", dir.display());
        assert_eq!(choose_socket_dir(&long, 5432).0, dir, "stable");
        assert!(choose_socket_dir(Path::new("/a,b"), 5432).1);
        assert!(choose_socket_dir(Path::new("/a b"), 5432).1);
    }

    #[test]
    fn rejects_shell_hostile_paths() {
        assert!(check_path_chars(Path::new("/tmp/ok dir,x")).is_ok());
        for bad in ["/tmp/a\"b", "/tmp/$x", "/tmp/a`b", "/tmp/a\\b"] {
            assert!(
                matches!(
                    check_path_chars(Path::new(bad)),
                    Err(Error::InvalidDir { .. })
                ),
                "{bad}"
            );
        }
    }
}
