//! The open-file limit. Every agent holds one TCP connection, so the ingest
//! needs about one descriptor per agent; distributions start services with a
//! soft `RLIMIT_NOFILE` of 1024 (systemd's default) while the hard limit is
//! far higher. Raising the soft limit to the hard one is what the hard limit
//! exists for, and needs no privilege.

/// The soft and hard `RLIMIT_NOFILE` before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises this process's soft open-file limit to its hard limit.
pub fn raise_nofile_limit() -> std::io::Result<NofileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft_before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; the kernel only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(NofileLimit {
        soft_before,
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let limit = raise_nofile_limit().expect("getrlimit/setrlimit");
        assert_eq!(limit.soft, limit.hard);
        assert!(limit.soft >= limit.soft_before);
        // Idempotent: a second call finds nothing to raise.
        let again = raise_nofile_limit().expect("second call");
        assert_eq!(again.soft_before, again.soft);
    }
}
