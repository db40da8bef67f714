//! Reading `/proc` by hand: whole files into reused buffers, and small parsers for the
//! files the scrapers need. Nothing here allocates per call once the buffers are warm.

use std::fs::File;
use std::io;
use std::path::Path;

/// Linux `ESRCH`: what a `/proc/PID` file read returns once the process is gone.
const ESRCH: i32 = 3;

/// Whether `err` means the process went away (between listing and reading, or mid-read).
pub fn is_gone(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(ESRCH)
}

/// A growable buffer whose allocation is kept from one file to the next.
#[derive(Debug, Default)]
pub struct FileBuf {
    data: Vec<u8>,
    len: usize,
}

impl FileBuf {
    /// Reads all of `path` into what is already allocated, growing only when a file is
    /// larger than any before (`/proc` files report size 0, so there is no size hint).
    pub fn read(&mut self, path: &Path) -> io::Result<&[u8]> {
        let file = File::open(path)?;
        self.read_at(&file)
    }

    /// Reads all of `file` from offset 0 (`pread`), whatever was read from it before:
    /// procfs generates a file's content afresh on every read from offset 0, so a file kept
    /// open reads as a new one would, without the path lookup and open.
    ///
    /// A read that leaves room in the buffer is taken as the end of the file, saving the
    /// usual extra read that returns 0: `/proc`'s seq_file and `cmdline` reads return all
    /// they have up to the requested count, as regular files do. Syscalls are most of a
    /// scrape's cost, so this saves about a quarter of them.
    pub fn read_at(&mut self, file: &File) -> io::Result<&[u8]> {
        use std::os::unix::fs::FileExt as _;
        self.len = 0;
        loop {
            if self.len == self.data.len() {
                let grown = (self.data.len() * 2).max(4096);
                self.data.resize(grown, 0);
            }
            let room = self.data.len() - self.len;
            let offset = self.len as u64;
            let n = match file.read_at(&mut self.data[self.len..], offset) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            self.len += n;
            if n == 0 || n < room {
                break;
            }
        }
        Ok(self.bytes())
    }

    pub fn bytes(&self) -> &[u8] {
        self.data.get(..self.len).unwrap_or_default()
    }
}

/// A path buffer of the shape `<root>/proc/<pid>/<file>` that is rewritten in place.
#[derive(Debug)]
pub struct PathBuf {
    buf: String,
    proc_len: usize,
    pid_len: usize,
}

impl PathBuf {
    /// `proc_dir` is the `/proc` directory to read, e.g. `/hostfs/proc`.
    pub fn new(proc_dir: &Path) -> Self {
        let mut buf = proc_dir.to_string_lossy().into_owned();
        if !buf.ends_with('/') {
            buf.push('/');
        }
        let proc_len = buf.len();
        Self {
            buf,
            proc_len,
            pid_len: proc_len,
        }
    }

    /// Points the buffer at `<proc>/<pid>/`.
    pub fn set_pid(&mut self, pid: u32) {
        use std::fmt::Write as _;
        self.buf.truncate(self.proc_len);
        // Writing to a String cannot fail.
        let _ = write!(self.buf, "{pid}/");
        self.pid_len = self.buf.len();
    }

    /// `<proc>/<pid>/<file>`.
    pub fn file(&mut self, file: &str) -> &Path {
        self.buf.truncate(self.pid_len);
        self.buf.push_str(file);
        Path::new(&self.buf)
    }

    /// `<proc>/<file>`, for host-wide files such as `stat` or `net/dev`.
    pub fn host_file(&mut self, file: &str) -> &Path {
        self.buf.truncate(self.proc_len);
        self.buf.push_str(file);
        Path::new(&self.buf)
    }
}

/// Parses an unsigned decimal; `None` on anything else (including overflow).
pub fn parse_u64(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(value)
}

/// Parses a signed decimal.
pub fn parse_i64(bytes: &[u8]) -> Option<i64> {
    match bytes.split_first() {
        Some((b'-', rest)) => parse_u64(rest)
            .and_then(|v| i64::try_from(v).ok())
            .map(|v| -v),
        _ => parse_u64(bytes).and_then(|v| i64::try_from(v).ok()),
    }
}

pub fn parse_hex(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
}

pub fn parse_f64(bytes: &[u8]) -> Option<f64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Splits on ASCII whitespace, skipping empty fields.
pub fn fields(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
}

pub fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}

/// The fields of `/proc/PID/stat` the process scraper uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PidStat<'a> {
    pub comm: &'a [u8],
    /// `R`, `S`, `Z` (zombie: exited, not yet reaped), ...
    pub state: u8,
    pub ppid: i64,
    pub flags: u64,
    pub minflt: u64,
    pub majflt: u64,
    pub utime: u64,
    pub stime: u64,
    pub num_threads: u64,
    pub starttime: u64,
    pub vsize: u64,
    pub rss_pages: u64,
    pub blkio_ticks: u64,
}

/// `PF_KTHREAD` in the `flags` field: a kernel thread, which has no executable.
pub const PF_KTHREAD: u64 = 0x0020_0000;

/// Parses `/proc/PID/stat`. The command name is between the first `(` and the last `)`,
/// and may itself hold spaces and parentheses.
pub fn parse_pid_stat(bytes: &[u8]) -> Option<PidStat<'_>> {
    let open = bytes.iter().position(|&b| b == b'(')?;
    let close = bytes.iter().rposition(|&b| b == b')')?;
    let comm = bytes.get(open + 1..close)?;
    // Field 3 (state) is the first after the name; field n is at index n - 3.
    let mut rest = fields(bytes.get(close + 1..)?);
    let mut stat = PidStat {
        comm,
        ..Default::default()
    };
    let mut at = |n: usize| -> Option<&[u8]> { rest.nth(n) };
    // Each `at(k)` skips k fields past the previous one.
    stat.state = at(0)?.first().copied().unwrap_or(b'?'); // 3
    stat.ppid = parse_i64(at(0)?)?; // 4
    stat.flags = parse_u64(at(4)?)?; // 9
    stat.minflt = parse_u64(at(0)?)?; // 10
    stat.majflt = parse_u64(at(1)?)?; // 12
    stat.utime = parse_u64(at(1)?)?; // 14
    stat.stime = parse_u64(at(0)?)?; // 15
    stat.num_threads = parse_u64(at(4)?)?; // 20
    stat.starttime = parse_u64(at(1)?)?; // 22
    stat.vsize = parse_u64(at(0)?)?; // 23
    stat.rss_pages = parse_i64(at(0)?)?.max(0) as u64; // 24
                                                       // 42 delayacct_blkio_ticks; absent on very old kernels.
    stat.blkio_ticks = at(17).and_then(parse_u64).unwrap_or(0);
    Some(stat)
}

/// The fields of `/proc/PID/status` the process scraper uses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PidStatus {
    pub voluntary_ctxt_switches: u64,
    pub nonvoluntary_ctxt_switches: u64,
    /// Signals pending for the whole process (`ShdPnd`), as a bit mask.
    pub shared_pending: u64,
}

pub fn parse_pid_status(bytes: &[u8]) -> PidStatus {
    let mut status = PidStatus::default();
    for line in lines(bytes) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (key, value) = (&line[..colon], &line[colon + 1..]);
        let first = fields(value).next().unwrap_or_default();
        match key {
            b"voluntary_ctxt_switches" => {
                status.voluntary_ctxt_switches = parse_u64(first).unwrap_or(0)
            }
            b"nonvoluntary_ctxt_switches" => {
                status.nonvoluntary_ctxt_switches = parse_u64(first).unwrap_or(0)
            }
            b"ShdPnd" => status.shared_pending = parse_hex(first).unwrap_or(0),
            _ => {}
        }
    }
    status
}

/// The fields of `/proc/PID/io` the process scraper uses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PidIo {
    pub syscr: u64,
    pub syscw: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// Parses `/proc/PID/io`; `None` when it holds none of the expected keys.
pub fn parse_pid_io(bytes: &[u8]) -> Option<PidIo> {
    let mut io = PidIo::default();
    let mut seen = false;
    for line in lines(bytes) {
        let mut parts = line.splitn(2, |&b| b == b':');
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some(value) = fields(value).next().and_then(parse_u64) else {
            continue;
        };
        let slot = match key {
            b"syscr" => &mut io.syscr,
            b"syscw" => &mut io.syscw,
            b"read_bytes" => &mut io.read_bytes,
            b"write_bytes" => &mut io.write_bytes,
            _ => continue,
        };
        *slot = value;
        seen = true;
    }
    seen.then_some(io)
}

/// `/proc/PID/cmdline` as the Collector shows it: arguments joined by single spaces,
/// trailing NULs dropped, bytes that are not UTF-8 replaced by U+FFFD. One allocation of the
/// exact size when the bytes are UTF-8.
pub fn command_line(bytes: &[u8]) -> String {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&bytes[..end]);
    let mut out = String::with_capacity(text.len());
    for (i, arg) in text.split('\0').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(arg);
    }
    out
}

/// The first argument of `/proc/PID/cmdline` (the command).
pub fn command(bytes: &[u8]) -> String {
    let first = bytes.split(|&b| b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(first).into_owned()
}

/// Host-wide values from `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostStat {
    /// Boot time, seconds since the epoch.
    pub btime: u64,
    pub logical_cpus: u64,
}

pub fn parse_host_stat(bytes: &[u8]) -> HostStat {
    let mut stat = HostStat::default();
    for line in lines(bytes) {
        if line.starts_with(b"cpu") && line.get(3).is_some_and(|b| b.is_ascii_digit()) {
            stat.logical_cpus += 1;
        } else if let Some(rest) = line.strip_prefix(b"btime ") {
            stat.btime = fields(rest).next().and_then(parse_u64).unwrap_or(0);
        }
    }
    stat
}

/// Looks `key` up in `/proc/meminfo` text, in bytes.
pub fn meminfo_bytes(bytes: &[u8], key: &[u8]) -> Option<u64> {
    lines(bytes).find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(b":")?;
        let mut parts = fields(rest);
        let value = parse_u64(parts.next()?)?;
        Some(match parts.next() {
            Some(b"kB") => value.saturating_mul(1024),
            _ => value,
        })
    })
}

/// The kernel's clock tick rate and page size, read from the auxiliary vector of this
/// process (`AT_CLKTCK`, `AT_PAGESZ`) so no `unsafe` libc call is needed. Falls back to the
/// universal Linux values 100 and 4096.
pub fn kernel_constants(proc_dir: &Path) -> (u64, u64) {
    const AT_PAGESZ: u64 = 6;
    const AT_CLKTCK: u64 = 17;
    let (mut clk_tck, mut page_size) = (100, 4096);
    if let Ok(bytes) = std::fs::read(proc_dir.join("self/auxv")) {
        for pair in bytes.chunks_exact(16) {
            let word = |b: &[u8]| b.try_into().map(u64::from_ne_bytes).unwrap_or(0);
            let (key, value) = (word(&pair[..8]), word(&pair[8..]));
            match key {
                AT_PAGESZ if value > 0 => page_size = value,
                AT_CLKTCK if value > 0 => clk_tck = value,
                _ => {}
            }
        }
    }
    (clk_tck, page_size)
}

/// The CPU time of process `pid`, all its threads (living and exited) together, in ns: the
/// kernel's per-process CPU clock, which no permission guards (the same time is in
/// `/proc/PID/stat` for anyone to read). It advances whenever a thread of the process runs,
/// and is the run time `stat`'s user and system times are scaled to. `pid` is taken in this
/// process's PID namespace. `None` when there is no such process.
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    // MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) of the kernel's posix-timers.h. glibc's
    // `clock_getcpuclockid` makes the same id, with a `clock_getres` call to check it.
    let pid = i32::try_from(pid).ok()?;
    let id = ((!pid) << 3) | 2;
    let time = nix::time::clock_gettime(nix::time::ClockId::from_raw(id)).ok()?;
    let secs = u64::try_from(time.tv_sec()).ok()?;
    let nanos = u64::try_from(time.tv_nsec()).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Whether `proc_dir` is a procfs of this process's own PID namespace, so that a PID listed
/// there names the same process for [`process_cpu_ns`]. `NSpid` in `<proc>/self/status`
/// lists this process's PID in each namespace from the procfs's own down to this process's:
/// one entry, equal to `getpid()`, means they are the same. A fixture tree has no such file.
pub fn is_own_pid_namespace(proc_dir: &Path) -> bool {
    let Ok(status) = std::fs::read(proc_dir.join("self/status")) else {
        return false;
    };
    let Some(line) = lines(&status).find_map(|l| l.strip_prefix(b"NSpid:")) else {
        return false;
    };
    let mut pids = fields(line);
    let own = u64::from(
        rustix::process::getpid()
            .as_raw_nonzero()
            .get()
            .unsigned_abs(),
    );
    pids.next().and_then(parse_u64) == Some(own) && pids.next().is_none()
}

/// Size and resident set of a process in pages, from `/proc/PID/statm`, at a quarter of
/// `stat`'s cost to generate: the size is `stat`'s `vsize` (in bytes there); the resident
/// set is what gopsutil reports, where `stat`'s `rss` can be the kernel's approximate count.
pub fn parse_statm(bytes: &[u8]) -> Option<(u64, u64)> {
    let mut fields = fields(bytes);
    let size = parse_u64(fields.next()?)?;
    let resident = parse_u64(fields.next()?)?;
    Some((size, resident))
}

/// The soft and hard `RLIMIT_NOFILE` of this process (`None`: unlimited).
pub fn open_files_limit() -> (Option<u64>, Option<u64>) {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    (limit.current, limit.maximum)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one, as Go programs (the Collector among them)
/// do at start: the soft limit is often 1024 for compatibility with `select()`, which the
/// agent does not use, and the process scraper keeps a few files open per process.
/// Returns the soft limit before and after; an error leaves the limit as it was.
pub fn raise_open_files_limit() -> io::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current == limit.maximum {
        return Ok((before, before));
    }
    setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok((before, getrlimit(Resource::Nofile).current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_names() {
        let line = b"42 (a (b) c) S 7 42 42 0 -1 4194560 11 0 3 0 250 125 0 0 20 0 4 0 9000 10485760 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 5 0 0\n";
        let stat = parse_pid_stat(line).unwrap();
        assert_eq!(stat.comm, b"a (b) c");
        assert_eq!(stat.ppid, 7);
        assert_eq!(stat.flags, 4194560);
        assert_eq!((stat.minflt, stat.majflt), (11, 3));
        assert_eq!((stat.utime, stat.stime), (250, 125));
        assert_eq!(stat.num_threads, 4);
        assert_eq!(stat.starttime, 9000);
        assert_eq!(stat.vsize, 10485760);
        assert_eq!(stat.rss_pages, 300);
        assert_eq!(stat.blkio_ticks, 5);
        assert!(parse_pid_stat(b"42 (x) S").is_none());
        assert!(parse_pid_stat(b"").is_none());
    }

    #[test]
    fn command_lines_join_arguments_with_spaces() {
        assert_eq!(command_line(b"sh\0-c\0echo a  b\0\0"), "sh -c echo a  b");
        assert_eq!(command_line(b""), "");
        assert_eq!(command_line(b"\0\0"), "");
        assert_eq!(command_line(b"a\0\0b\0"), "a  b");
        assert_eq!(command_line(b"x\xff\0y"), "x\u{fffd} y");
        assert_eq!(command(b"/bin/sleep\x00100\x00"), "/bin/sleep");
    }

    #[test]
    fn numbers_reject_garbage() {
        assert_eq!(parse_u64(b"123"), Some(123));
        assert_eq!(parse_u64(b"99999999999999999999999"), None);
        assert_eq!(parse_u64(b"1a"), None);
        assert_eq!(parse_i64(b"-1"), Some(-1));
        assert_eq!(parse_hex(b"0000000000000101"), Some(0x101));
    }

    #[test]
    fn meminfo_values_are_bytes() {
        let text = b"MemTotal:       16384 kB\nMemFree:  1 kB\nHugePages_Total:       0\n";
        assert_eq!(meminfo_bytes(text, b"MemTotal"), Some(16384 * 1024));
        assert_eq!(meminfo_bytes(text, b"MemFree"), Some(1024));
        assert_eq!(meminfo_bytes(text, b"HugePages_Total"), Some(0));
        assert_eq!(meminfo_bytes(text, b"Cached"), None);
    }

    #[test]
    fn kernel_constants_come_from_auxv() {
        let (clk_tck, page_size) = kernel_constants(Path::new("/proc"));
        assert!(clk_tck > 0 && page_size >= 4096);
    }
}
