//! The server's cluster through `initdb` and `pg_ctl`: creating it, starting
//! the server with its settings, and clearing a postmaster left over from a
//! crashed run.

use std::ffi::OsString;
use std::io;
use std::path::Path;

use super::prepare::make_private_dir;
use super::process::{Cmd, is_alive, read_postmaster_pid, run_async, runs_in_dir};
use super::{EmbeddedPg, Error, Options, POSTGRES_USER, io_ctx};

/// Seconds `pg_ctl -w` waits for the server to start or stop (`pg_ctl -t`).
const PG_CTL_WAIT_SECS: u64 = 60;

/// `max_connections` of the server, in both modes (tests open many pools).
const MAX_CONNECTIONS: u32 = 200;

/// `max_wal_size` of the server, in both modes. PostgreSQL's default (1 GB)
/// starts a checkpoint once ~0.5 GB of WAL has been written since the last
/// one; firing 10 000 runs a second writes ~40 MB of WAL a second, so that
/// is a checkpoint every ~15 s, each followed by a burst of full-page
/// images (more WAL and work just as fires are due; the bench's 60 s
/// windows did not separate the two settings, `docs/operations.md`).
/// 8 GB spaces them ~2 min apart at that rate; an idle node still keeps
/// only `min_wal_size` (80 MB).
const MAX_WAL_SIZE: &str = "8GB";

/// `wal_init_zero` of the server, in both modes. With PostgreSQL's default
/// (`on`) a new WAL segment is written full of zeros (16 MB) and flushed
/// by the backend whose write crosses into it, while every committing
/// transaction waits for that flush. Until checkpoints recycle old
/// segments (a new cluster, or WAL written faster than checkpoints free
/// it), that is every new segment: measured with `sked-bench fire` (10 000
/// fires a second, ~22 MB of WAL a second) as commits of ~55 ms every
/// ~0.75 s, lag p99 104–110 ms; with recycled segments, 41 ms. `off`
/// writes only a segment's last byte. Nothing depends on the zeros: the
/// end of WAL is found by each record's checksum (recycled segments hold
/// old records anyway); a full disk fails WAL writes either way.
const WAL_INIT_ZERO: &str = "off";

/// `backend_flush_after` of the server, in both modes. PostgreSQL's default
/// (0) leaves the data pages a backend writes out of its shared buffers in
/// the kernel's page cache until the kernel writes them back on its own,
/// which Linux does for all pages older than 30 s at once: with 10 000
/// fires a second, ~300 MB every ~31 s, and every WAL flush waiting behind
/// that burst (commits of 40–70 ms; the worst seconds of `sked-bench
/// fire`). With 256 kB a backend asks the kernel to start writing after
/// every 256 kB it wrote, so the writes go out steadily (what the
/// checkpointer and the background writer do by default).
const BACKEND_FLUSH_AFTER: &str = "256kB";

impl EmbeddedPg {
    pub(super) fn pg_ctl_command(&self, args: &[OsString]) -> Cmd {
        Cmd {
            program: self.bin_dir.join("pg_ctl"),
            args: args.to_vec(),
        }
    }

    pub(super) fn postmaster_pid(&self) -> Option<i32> {
        read_postmaster_pid(&self.data_dir.join("postmaster.pid"))
    }

    pub(super) fn after_stop(&self) {
        if self.socket_dir_is_tmp {
            // Only succeeds if empty, which it is once the server has gone.
            let _ = std::fs::remove_dir(&self.socket_dir);
        }
        tracing::info!(data_dir = %self.data_dir.display(), "embedded PostgreSQL stopped");
    }

    /// Runs `initdb` into `<dir>/pgdata.initdb`, then renames it to `<dir>/pgdata`.
    pub(super) async fn initdb(&self, opts: Options) -> Result<(), Error> {
        let scratch = self.base_dir.join("pgdata.initdb");
        let data_dir = self.data_dir.clone();
        let run_as = self.run_as;
        let scratch2 = scratch.clone();
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            if scratch2.exists() {
                // Left over from an interrupted initdb of ours.
                std::fs::remove_dir_all(&scratch2)
                    .map_err(io_ctx(format!("removing {}", scratch2.display())))?;
            }
            if data_dir.exists() {
                // `prepare` checked it is empty.
                std::fs::remove_dir(&data_dir)
                    .map_err(io_ctx(format!("removing empty {}", data_dir.display())))?;
            }
            make_private_dir(&scratch2, run_as)
        })
        .await
        .map_err(|e| Error::Io {
            context: "preparing initdb".into(),
            source: io::Error::other(e.to_string()),
        })??;

        tracing::info!(data_dir = %self.data_dir.display(), "initializing PostgreSQL cluster");
        let mut args: Vec<OsString> = vec![
            "-D".into(),
            scratch.clone().into(),
            "-U".into(),
            POSTGRES_USER.into(),
            "--auth=trust".into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C".into(),
        ];
        if opts.fast_unsafe {
            args.push("--no-sync".into());
        }
        let cmd = Cmd {
            program: self.bin_dir.join("initdb"),
            args,
        };
        run_async(&cmd, self.run_as, None).await?;

        tokio::fs::rename(&scratch, &self.data_dir)
            .await
            .map_err(io_ctx(format!(
                "renaming {} to {}",
                scratch.display(),
                self.data_dir.display()
            )))?;
        if !opts.fast_unsafe {
            let base = self.base_dir.clone();
            // Make the rename durable; failure to sync a directory is not fatal.
            let _ = tokio::task::spawn_blocking(move || {
                std::fs::File::open(&base).and_then(|d| d.sync_all())
            })
            .await;
        }
        Ok(())
    }

    /// Deals with a `postmaster.pid` left by an earlier run (see the module docs).
    pub(super) async fn clear_leftover_postmaster(&self) -> Result<(), Error> {
        let pid_file = self.data_dir.join("postmaster.pid");
        if !pid_file.exists() {
            return Ok(());
        }
        let Some(pid) = read_postmaster_pid(&pid_file) else {
            // Unparseable: no postmaster can be using it (postgres would refuse it).
            tracing::warn!(path = %pid_file.display(), "removing unreadable postmaster.pid");
            return self.remove_lock_files().await;
        };
        if !is_alive(pid) {
            // A stale file of a dead postmaster: PostgreSQL replaces it itself.
            return Ok(());
        }
        match runs_in_dir(pid, &self.data_dir) {
            Some(false) => {
                tracing::warn!(
                    pid,
                    path = %pid_file.display(),
                    "postmaster.pid names a live process that is not this cluster's \
                     postmaster (reused PID); removing the stale lock files"
                );
                self.remove_lock_files().await
            }
            Some(true) | None => {
                tracing::warn!(
                    pid,
                    data_dir = %self.data_dir.display(),
                    "PostgreSQL from an earlier run is still running; restarting it"
                );
                let cmd = self.pg_ctl_command(&pg_ctl_stop_args(&self.data_dir, "fast"));
                run_async(&cmd, self.run_as, Some(&self.log_file)).await
            }
        }
    }

    async fn remove_lock_files(&self) -> Result<(), Error> {
        let files = [
            self.data_dir.join("postmaster.pid"),
            self.socket_dir.join(format!(".s.PGSQL.{}.lock", self.port)),
        ];
        for f in files {
            match tokio::fs::remove_file(&f).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_ctx(format!("removing {}", f.display()))(e)),
            }
        }
        Ok(())
    }

    pub(super) async fn pg_ctl_start(&self, opts: Options) -> Result<(), Error> {
        let mut server_opts: Vec<String> = vec![
            "-k".into(),
            self.socket_dir.to_string_lossy().into_owned(),
            "-p".into(),
            self.port.to_string(),
            "-c".into(),
            "listen_addresses=".into(),
            "-c".into(),
            "unix_socket_permissions=0700".into(),
            "-c".into(),
            format!("max_connections={MAX_CONNECTIONS}"),
            "-c".into(),
            format!("max_wal_size={MAX_WAL_SIZE}"),
            "-c".into(),
            format!("wal_init_zero={WAL_INIT_ZERO}"),
            "-c".into(),
            format!("backend_flush_after={BACKEND_FLUSH_AFTER}"),
        ];
        if opts.fast_unsafe {
            for setting in [
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
            ] {
                server_opts.push("-c".into());
                server_opts.push(setting.into());
            }
        }
        // pg_ctl hands `-o` to /bin/sh: quote every word.
        let o = server_opts
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ");
        let args: Vec<OsString> = vec![
            "start".into(),
            "-D".into(),
            self.data_dir.clone().into(),
            "-l".into(),
            self.log_file.clone().into(),
            "-w".into(),
            "-t".into(),
            PG_CTL_WAIT_SECS.to_string().into(),
            "-s".into(),
            "-o".into(),
            o.into(),
        ];
        run_async(
            &self.pg_ctl_command(&args),
            self.run_as,
            Some(&self.log_file),
        )
        .await
    }
}

pub(super) fn pg_ctl_stop_args(data_dir: &Path, mode: &str) -> Vec<OsString> {
    vec![
        "stop".into(),
        "-D".into(),
        data_dir.into(),
        "-m".into(),
        mode.into(),
        "-w".into(),
        "-t".into(),
        PG_CTL_WAIT_SECS.to_string().into(),
        "-s".into(),
    ]
}

/// Single-quotes `word` for /bin/sh.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_escapes_single_quotes() {
        assert_eq!(shell_quote("listen_addresses="), "'listen_addresses='");
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
