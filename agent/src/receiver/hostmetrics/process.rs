//! `process` scraper: one resource per process, read from `/proc/PID/{stat,statm,status,
//! cmdline,exe,io,fd}`, with the Collector's resource attributes and metrics.
//!
//! Files are read only when an enabled metric or attribute needs them, into buffers reused
//! for every process. A process's files stay open from one scrape to the next and are re-read
//! from offset 0 (up to `max_open_files`; beyond it, open/read/close): opening a `/proc` file
//! costs more than generating its content. A process that exits between listing and reading
//! is skipped and counted (`reason="vanished"`); a file the agent may not read (another user's
//! `io`, `exe` or `fd/` without `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH`) leaves out only
//! what comes from it, also counted.
//!
//! A process that has not run since its last full read is written from that read, with only
//! its memory (`statm`) read again: its CPU clock, read by PID, tells whether any of its
//! threads ran, and nothing else in its files changes while none does
//! ([`ProcessScraper::read_idle`]). Most processes of a node sleep through most scrapes.
//!
//! Output is written as OTLP bytes ([`super::encode`]), not prost structs: a process's
//! resource is encoded when first seen and again only when one of its attributes changed,
//! so a steady-state scrape allocates nothing per process.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ahash::AHashMap;
use indexmap::IndexMap;
use prost::Message;
use rustix::fs::{Mode, OFlags};
use serde::Deserialize;
use serde_yaml::Value;

use super::encode::{self, RequestWriter};
use super::metadata::{self, MetricDef};
use super::procfs::{self, FileBuf};
use super::{
    MatchType, MetricSwitches, NameFilter, Reason, ScrapeContext, Scraper, Toggle, SCHEMA_URL,
};
use crate::config::{self, Issue};

const NAME: &str = "process";

/// The longest `exe` link procfs answers: a page (`PATH_MAX`).
const EXE_LINK_MAX: usize = 4096;

/// The kernel truncates a command name (`comm`) to this many bytes.
const COMM_MAX: usize = 15;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawProcessConfig {
    #[serde(default)]
    include: Option<NameMatch>,
    #[serde(default)]
    exclude: Option<NameMatch>,
    #[serde(default)]
    mute_process_name_error: bool,
    #[serde(default)]
    mute_process_exe_error: bool,
    #[serde(default)]
    mute_process_io_error: bool,
    #[serde(default)]
    mute_process_user_error: bool,
    #[serde(default)]
    mute_process_all_errors: bool,
    /// Processes younger than this are not reported yet.
    #[serde(default, with = "humantime_serde")]
    scrape_process_delay: Duration,
    #[serde(default)]
    resource_attributes: IndexMap<String, Toggle>,
    #[serde(default)]
    metrics: IndexMap<String, Toggle>,
    /// Files kept open across scrapes; the default is derived from `RLIMIT_NOFILE`.
    #[serde(default)]
    max_open_files: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct NameMatch {
    names: Vec<String>,
    #[serde(default)]
    match_type: MatchType,
}

/// Which resource attributes are on.
#[derive(Debug, Clone, Copy)]
struct Attributes {
    pid: bool,
    parent_pid: bool,
    executable_name: bool,
    executable_path: bool,
    command: bool,
    command_line: bool,
    owner: bool,
}

/// Which metrics are on, resolved once from the switches.
#[derive(Debug, Clone, Copy)]
struct Metrics {
    cpu_time: bool,
    cpu_utilization: bool,
    memory_usage: bool,
    memory_virtual: bool,
    memory_utilization: bool,
    disk_io: bool,
    disk_operations: bool,
    paging_faults: bool,
    signals_pending: bool,
    threads: bool,
    open_file_descriptors: bool,
    context_switches: bool,
    uptime: bool,
}

#[derive(Debug)]
pub struct ProcessSettings {
    include: Option<NameFilter>,
    exclude: Option<NameFilter>,
    mute_name: bool,
    mute_exe: bool,
    mute_io: bool,
    mute_user: bool,
    scrape_process_delay: Duration,
    attributes: Attributes,
    metrics: Metrics,
    max_open_files: Option<usize>,
}

pub fn parse(value: Value, issues: &mut Vec<Issue>) -> Option<ProcessSettings> {
    let raw: RawProcessConfig = config::deserialize(value)
        .map_err(|i| issues.push(i))
        .ok()?;
    let filter = |m: &Option<NameMatch>, path: &str, issues: &mut Vec<Issue>| {
        m.as_ref()
            .and_then(|m| NameFilter::compile(&m.names, m.match_type, path, issues))
    };
    let include = filter(&raw.include, "include.names", issues);
    let exclude = filter(&raw.exclude, "exclude.names", issues);
    for key in raw.resource_attributes.keys() {
        if !metadata::PROCESS_RESOURCE_ATTRIBUTES
            .iter()
            .any(|(k, _, _)| k == key)
        {
            let known: Vec<&str> = metadata::PROCESS_RESOURCE_ATTRIBUTES
                .iter()
                .map(|(k, _, _)| *k)
                .collect();
            issues.push(Issue::new(
                format!("resource_attributes.{key}"),
                format!("unknown resource attribute; known: {}", known.join(", ")),
            ));
        }
    }
    let attr = |key: &str| raw.resource_attributes.get(key).is_none_or(|t| t.enabled);
    let attributes = Attributes {
        pid: attr("process.pid"),
        parent_pid: attr("process.parent_pid"),
        executable_name: attr("process.executable.name"),
        executable_path: attr("process.executable.path"),
        command: attr("process.command"),
        command_line: attr("process.command_line"),
        owner: attr("process.owner"),
    };
    let switches = MetricSwitches::resolve(NAME, &raw.metrics, "metrics", issues);
    let metrics = Metrics {
        cpu_time: switches.on(&metadata::PROCESS_CPU_TIME),
        cpu_utilization: switches.on(&metadata::PROCESS_CPU_UTILIZATION),
        memory_usage: switches.on(&metadata::PROCESS_MEMORY_USAGE),
        memory_virtual: switches.on(&metadata::PROCESS_MEMORY_VIRTUAL),
        memory_utilization: switches.on(&metadata::PROCESS_MEMORY_UTILIZATION),
        disk_io: switches.on(&metadata::PROCESS_DISK_IO),
        disk_operations: switches.on(&metadata::PROCESS_DISK_OPERATIONS),
        paging_faults: switches.on(&metadata::PROCESS_PAGING_FAULTS),
        signals_pending: switches.on(&metadata::PROCESS_SIGNALS_PENDING),
        threads: switches.on(&metadata::PROCESS_THREADS),
        open_file_descriptors: switches.on(&metadata::PROCESS_OPEN_FILE_DESCRIPTORS),
        context_switches: switches.on(&metadata::PROCESS_CONTEXT_SWITCHES),
        uptime: switches.on(&metadata::PROCESS_UPTIME),
    };
    let all = raw.mute_process_all_errors;
    Some(ProcessSettings {
        include,
        exclude,
        mute_name: all || raw.mute_process_name_error,
        mute_exe: all || raw.mute_process_exe_error,
        mute_io: all || raw.mute_process_io_error,
        mute_user: all || raw.mute_process_user_error,
        scrape_process_delay: raw.scrape_process_delay,
        attributes,
        metrics,
        max_open_files: raw.max_open_files,
    })
}

/// CPU seconds of one process at one scrape, for `process.cpu.utilization`.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    time: u64,
    user: f64,
    system: f64,
    wait: f64,
}

/// What is kept of one process from one scrape to the next, for as long as its PID has the
/// same start time (a new process under the PID starts afresh).
#[derive(Debug)]
struct Known {
    starttime: u64,
    /// The scrape that last saw the process; older entries are dropped.
    generation: u64,
    cpu: Option<CpuSample>,
    /// The `exe` target, and the `comm` it was read under: it is read again only when `comm`
    /// changes, which `execve` does (to the new program's name).
    exe: Option<(Box<[u8]>, String)>,
    /// The encoded resource, reused while what it was built from is the same.
    resource: Option<Box<CachedResource>>,
    /// `ppid` as last read.
    ppid: Option<i64>,
    /// The process's CPU clock in the scrape that read it (see [`ProcessScraper::clock`]).
    clock: Option<(u64, Option<u64>)>,
    /// What the last full read found, while the process has not run since.
    steady: Option<Box<Steady>>,
    /// `io`, the `exe` link and the `fd` directory refused, asked again only when due (see
    /// [`Refusal`]).
    io_refused: Option<Refusal>,
    exe_refused: Option<Refusal>,
    fd_refused: Option<Refusal>,
}

impl Known {
    fn new(starttime: u64, generation: u64) -> Self {
        Self {
            starttime,
            generation,
            cpu: None,
            exe: None,
            resource: None,
            ppid: None,
            clock: None,
            steady: None,
            io_refused: None,
            exe_refused: None,
            fd_refused: None,
        }
    }
}

/// Scrapes after which a refused file is asked for again although the process's owner and
/// group are the same: what the kernel checks can change without changing them (capabilities
/// dropped, `PR_SET_DUMPABLE`). The least of [`refusal_stands_for`].
pub(super) const ASK_REFUSED_AGAIN_AFTER: u64 = 10;

/// Scrapes a refusal of process `pid` stands, owner and group the same: 10 to 19, by PID, so
/// that the refusals of one scrape (at start, all of them) are not all asked again in one
/// later scrape.
pub(super) fn refusal_stands_for(pid: u32) -> u64 {
    ASK_REFUSED_AGAIN_AFTER + u64::from(pid) % ASK_REFUSED_AGAIN_AFTER
}

/// A permission error reading `io`, the `exe` link or the `fd` directory. The kernel guards
/// `exe` with its ptrace check, `fd` with its mode (0500, the process's owner) and `io` with
/// both, so an agent without `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH` is refused them for
/// every process of another user, every scrape: the refusal is counted again from here
/// instead, while it stands.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    /// Owner and group of `/proc/PID` when refused, the process's effective ids: a `setuid`,
    /// or an `exec` that changes credentials, changes them.
    ids: (u32, u32),
    errno: i32,
    /// The scrape from which it is asked again.
    due: u64,
}

impl Refusal {
    /// What to remember of `answer`, the kernel's to a read of process `pid`'s `dir`: the
    /// refusal it is, with the directory's owner and group (`ids`, `fstat`ed now if not yet),
    /// or nothing.
    fn remember<T>(
        answer: &io::Result<T>,
        pid: u32,
        dir: &OwnedFd,
        ids: &mut Option<(u32, u32)>,
        generation: u64,
    ) -> Option<Self> {
        let errno = answer.as_ref().err()?.raw_os_error()?;
        if errno != rustix::io::Errno::ACCESS.raw_os_error()
            && errno != rustix::io::Errno::PERM.raw_os_error()
        {
            return None;
        }
        *ids = ids.or_else(|| dir_ids(dir));
        Some(Self {
            ids: (*ids)?,
            errno,
            due: generation.saturating_add(refusal_stands_for(pid)),
        })
    }

    /// The error to count again, while the process has the owner and group it had and the
    /// refusal is not due to be asked again.
    fn standing(this: Option<Self>, ids: Option<(u32, u32)>, generation: u64) -> Option<io::Error> {
        this.filter(|r| Some(r.ids) == ids && generation < r.due)
            .map(|r| r.error())
    }

    fn error(self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

/// Where [`read_unsettled`] finds and remembers a refusal of the `fd` directory.
struct FdRefusal<'a> {
    remembered: &'a mut Option<Refusal>,
    /// Counted again without asking ([`Refusal::standing`]).
    stands: bool,
    /// Owner and group of `/proc/PID`, if read already; read for a new refusal.
    ids: &'a mut Option<(u32, u32)>,
}

/// Buffers of one scraper, for what [`read_unsettled`] reads.
struct UnsettledBufs {
    status: FileBuf,
    /// The `getdents` buffer for the `fd` directory, and for listing `<proc>`.
    dirents: Vec<MaybeUninit<u8>>,
}

/// The values of `/proc/PID/stat` a process's metrics are written from (its memory is read
/// from `statm`).
#[derive(Debug, Clone, Copy)]
struct StatValues {
    starttime: u64,
    utime: u64,
    stime: u64,
    blkio_ticks: u64,
    minflt: u64,
    majflt: u64,
    num_threads: u64,
}

impl StatValues {
    fn of(stat: &procfs::PidStat<'_>) -> Self {
        Self {
            starttime: stat.starttime,
            utime: stat.utime,
            stime: stat.stime,
            blkio_ticks: stat.blkio_ticks,
            minflt: stat.minflt,
            majflt: stat.majflt,
            num_threads: stat.num_threads,
        }
    }
}

/// What a full read of a process found that only the process itself changes, written again
/// from here while it does not run ([`ProcessScraper::read_idle`]). Its resource's inputs
/// (`comm`, the command line, `exe`) are in [`Known::resource`] and [`Known::exe`].
#[derive(Debug)]
struct Steady {
    /// The process's CPU clock, read before its files were.
    clock_ns: u64,
    /// The parent's CPU clock, read before the process's `stat` was: while it reads the
    /// same, the parent has not exited, so `ppid` still names it. `None` when it was not
    /// read before `stat` (a new parent, not read yet in this scrape) or is not needed
    /// (`ppid` 0 or 1).
    parent_clock_ns: Option<u64>,
    ppid: i64,
    /// A kernel thread: its parent is `kthreadd`, which never exits.
    kthread: bool,
    values: StatValues,
    io: Option<procfs::PidIo>,
    owner_uid: Option<u32>,
    /// Filtered out by `include`/`exclude`: nothing is written.
    filtered_out: bool,
    /// The errors the read counted, counted again each time it is reused.
    noted: Vec<Noted>,
}

/// `steady` boxed, in `spare`'s allocation when there is one.
fn boxed(steady: Option<Steady>, spare: Option<Box<Steady>>) -> Option<Box<Steady>> {
    let steady = steady?;
    Some(match spare {
        Some(mut spare) => {
            *spare = steady;
            spare
        }
        None => Box::new(steady),
    })
}

/// Counts an error of a full read of process `pid`, and keeps it in `noted` to count again
/// on reuse.
fn note(ctx: &mut ScrapeContext<'_>, noted: &mut Vec<Noted>, pid: u32, error: Noted) {
    ctx.errors
        .add(NAME, error.reason, error.muted, || error.example(pid));
    noted.push(error);
}

/// An error a full read counted (see [`Steady::noted`]). Its log line is made only when
/// logged: an agent without capabilities counts one or two for most processes every scrape.
#[derive(Debug, Clone, Copy)]
struct Noted {
    reason: Reason,
    muted: bool,
    /// The file.
    what: &'static str,
    cause: Cause,
}

#[derive(Debug, Clone, Copy)]
enum Cause {
    Os(i32),
    Kind(io::ErrorKind),
    Text(&'static str),
}

impl Cause {
    fn of(err: &io::Error) -> Self {
        err.raw_os_error().map_or(Self::Kind(err.kind()), Self::Os)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Os(errno) => io::Error::from_raw_os_error(errno).fmt(f),
            Self::Kind(kind) => io::Error::from(kind).fmt(f),
            Self::Text(text) => f.write_str(text),
        }
    }
}

impl Noted {
    fn example(&self, pid: u32) -> String {
        format!("pid {pid}: {}: {}", self.what, self.cause)
    }
}

/// A process's `Resource`, encoded, and the values it was built from (besides the PID, which
/// a [`Known`] keeps for life): building it is most of what a process would allocate per
/// scrape, and its attributes rarely change.
#[derive(Debug, Default)]
struct CachedResource {
    ppid: i64,
    comm: Vec<u8>,
    /// `cmdline` as read (empty when it was not).
    cmdline: Vec<u8>,
    exe: Option<String>,
    owner: Option<String>,
    /// Field 1 (`resource`) of a `ResourceMetrics`.
    bytes: Vec<u8>,
}

/// What a process's resource is built from.
struct ResourceInputs<'a> {
    pid: u32,
    ppid: i64,
    comm: &'a [u8],
    cmdline: &'a [u8],
    name: &'a str,
    exe: Option<&'a str>,
    owner: Option<&'a str>,
}

impl CachedResource {
    fn matches(&self, r: &ResourceInputs<'_>) -> bool {
        self.ppid == r.ppid
            && self.comm == r.comm
            && self.cmdline == r.cmdline
            && self.exe.as_deref() == r.exe
            && self.owner.as_deref() == r.owner
    }

    /// Encodes the enabled attributes of `r`, in the order the Collector emits them.
    fn rebuild(&mut self, a: Attributes, r: &ResourceInputs<'_>) {
        self.ppid = r.ppid;
        self.comm.clear();
        self.comm.extend_from_slice(r.comm);
        self.cmdline.clear();
        self.cmdline.extend_from_slice(r.cmdline);
        self.exe = r.exe.map(str::to_owned);
        self.owner = r.owner.map(str::to_owned);
        let buf = &mut self.bytes;
        buf.clear();
        let resource = encode::begin(buf, 1);
        if a.pid {
            encode::int_attr(buf, 1, "process.pid", i64::from(r.pid));
        }
        if a.parent_pid {
            encode::int_attr(buf, 1, "process.parent_pid", r.ppid);
        }
        if a.executable_name {
            encode::str_attr(buf, 1, "process.executable.name", r.name);
        }
        if let Some(exe) = r.exe {
            encode::str_attr(buf, 1, "process.executable.path", exe);
        }
        if a.command {
            let command = procfs::command(r.cmdline);
            encode::str_attr(buf, 1, "process.command", &command);
        }
        if a.command_line {
            let command_line = procfs::command_line(r.cmdline);
            encode::str_attr(buf, 1, "process.command_line", &command_line);
        }
        if let Some(owner) = r.owner {
            encode::str_attr(buf, 1, "process.owner", owner);
        }
        encode::end(buf, resource);
    }
}

/// uid → user name from `<root>/etc/passwd`, re-read when the file changes.
#[derive(Debug)]
struct Users {
    path: PathBuf,
    stamp: Option<(SystemTime, u64)>,
    names: HashMap<u32, String>,
}

impl Users {
    fn new(root: &Path) -> Self {
        Self {
            path: root.join("etc/passwd"),
            stamp: None,
            names: HashMap::new(),
        }
    }

    fn refresh(&mut self) {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp.is_some() && stamp == self.stamp {
            return;
        }
        self.stamp = stamp;
        self.names.clear();
        let Ok(text) = std::fs::read(&self.path) else {
            return;
        };
        for line in procfs::lines(&text) {
            let mut parts = line.split(|&b| b == b':');
            let (Some(name), Some(_), Some(uid)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if let Some(uid) = procfs::parse_u64(uid).and_then(|u| u32::try_from(u).ok()) {
                self.names
                    .entry(uid)
                    .or_insert_with(|| String::from_utf8_lossy(name).into_owned());
            }
        }
    }
}

/// `max_open_files` when not configured, and its upper bound: half the soft `RLIMIT_NOFILE`
/// (raised to the hard limit at agent start), leaving the rest to sockets and other files.
/// Beyond the limit every open would fail, skipping processes instead of only costing more.
fn open_files_bound() -> usize {
    /// Enough for ~250,000 processes; bounds an unlimited or huge limit.
    const CAP: u64 = 1 << 20;
    let (soft, _) = procfs::open_files_limit();
    usize::try_from(soft.unwrap_or(CAP).min(CAP) / 2).unwrap_or(0)
}

/// One process's `/proc/PID` files, kept open from one scrape to the next. A descriptor
/// refers to the process it was opened for: once that exits, reads fail with `ESRCH` even
/// when a new process has taken the PID, so a reused PID is never read through old files.
#[derive(Debug)]
struct ProcFiles {
    /// Inode of `/proc/PID` in the listing: a new process under the same PID has a new one.
    ino: u64,
    /// `starttime` of the process the files were opened for, once read.
    starttime: Option<u64>,
    /// `/proc/PID` itself: `fstat` gives the owner, `openat` the files below, `readlinkat`
    /// the `exe` link (read once per program, see [`Known::exe`]).
    dir: OwnedFd,
    stat: Option<File>,
    statm: Option<File>,
    cmdline: Option<File>,
    io: Option<File>,
    status: Option<File>,
    /// The `fd` directory, listed again from its start each scrape.
    fd: Option<OwnedFd>,
    /// Within `max_open_files`: the files stay open after the scrape. Otherwise each is
    /// closed once read, as when nothing is kept.
    keep: bool,
    /// The last scrape whose listing had the process.
    generation: u64,
    /// The last scrape wrote the process from its last full read ([`ProcessScraper::read_idle`]).
    idle: bool,
}

impl ProcFiles {
    fn open(dir: &Path, ino: u64, keep: bool, generation: u64) -> io::Result<Self> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        Ok(Self {
            ino,
            starttime: None,
            dir: rustix::fs::open(dir, flags, Mode::empty())?,
            stat: None,
            statm: None,
            cmdline: None,
            io: None,
            status: None,
            fd: None,
            keep,
            generation,
            idle: false,
        })
    }

    /// Descriptors held, the directory's included.
    fn count(&self) -> usize {
        let files = [
            &self.stat,
            &self.statm,
            &self.cmdline,
            &self.io,
            &self.status,
        ];
        1 + usize::from(self.fd.is_some()) + files.iter().filter(|f| f.is_some()).count()
    }
}

/// Counts a process whose owner has no name: its uid is not in the passwd file.
fn count_unknown_owner(ctx: &mut ScrapeContext<'_>, pid: u32, uid: u32, muted: bool) {
    ctx.errors.add(NAME, Reason::User, muted, || {
        format!("pid {pid}: uid {uid} is not in the passwd file")
    });
}

/// Owner and group of the process's directory.
fn dir_ids(dir: &OwnedFd) -> Option<(u32, u32)> {
    rustix::fs::fstat(dir).ok().map(|st| (st.st_uid, st.st_gid))
}

/// Reads `name` in the process's directory through the file kept in `slot`, opening it first
/// when there is none; a newly opened file is kept only if `keep` and the read succeeded
/// (a file that fails is opened again next time, as it was before files were kept).
fn read_file<'b>(
    dir: &OwnedFd,
    slot: &mut Option<File>,
    name: &str,
    keep: bool,
    buf: &'b mut FileBuf,
) -> io::Result<&'b [u8]> {
    if let Some(file) = slot.as_ref() {
        return buf.read_at(file);
    }
    let flags = OFlags::RDONLY | OFlags::CLOEXEC;
    let file = File::from(rustix::fs::openat(dir, name, flags, Mode::empty())?);
    buf.read_at(&file)?;
    if keep {
        *slot = Some(file);
    }
    Ok(buf.bytes())
}

/// Entries of the process's `fd` directory (`.` and `..` aside), through the descriptor kept
/// in `slot`, rewound to the start (procfs lists the descriptors of now on every read), or
/// opened first when there is none and kept if `keep`. `buf` is the `getdents` buffer.
fn count_fds(
    dir: &OwnedFd,
    slot: &mut Option<OwnedFd>,
    keep: bool,
    buf: &mut [MaybeUninit<u8>],
) -> io::Result<u64> {
    fn count(fd: &OwnedFd, buf: &mut [MaybeUninit<u8>]) -> io::Result<u64> {
        let mut entries = rustix::fs::RawDir::new(fd, buf);
        let mut n = 0;
        while let Some(entry) = entries.next() {
            let entry = entry?;
            if !matches!(entry.file_name().to_bytes(), b"." | b"..") {
                n += 1;
            }
        }
        Ok(n)
    }
    if let Some(fd) = slot.as_ref() {
        rustix::fs::seek(fd, rustix::fs::SeekFrom::Start(0))?;
        return count(fd, buf);
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, "fd", flags, Mode::empty())?;
    let n = count(&fd, buf)?;
    if keep {
        *slot = Some(fd);
    }
    Ok(n)
}

pub struct ProcessScraper {
    settings: Arc<ProcessSettings>,
    proc_dir: PathBuf,
    path: procfs::PathBuf,
    stat: FileBuf,
    statm: FileBuf,
    cmdline: FileBuf,
    io: FileBuf,
    /// Processes' CPU clocks can be read by the PIDs listed in `proc_dir`, which tell which
    /// processes ran since the last scrape ([`Self::read_idle`]).
    clocks: bool,
    /// Reused for `readlinkat` of `exe`: procfs fails a link longer than a page
    /// (`ENAMETOOLONG`), so a target never fills it.
    link: Box<[u8]>,
    /// Field 1 (`scope`) of a `ScopeMetrics`, encoded once; each process's gets a copy.
    scope: Vec<u8>,
    users: Users,
    known: AHashMap<u32, Known>,
    generation: u64,
    /// Kept-open files by PID; `open_files` counts their descriptors, at most
    /// `max_open_files` (between reads of one process, its own are not counted).
    files: AHashMap<u32, ProcFiles>,
    open_files: usize,
    max_open_files: usize,
    unsettled: UnsettledBufs,
    /// The PIDs and inodes listed.
    listed: Vec<(u32, u64)>,
}

impl ProcessScraper {
    pub fn new(settings: Arc<ProcessSettings>, proc_dir: &Path, root: &Path) -> Self {
        let bound = open_files_bound();
        let max_open_files = settings.max_open_files.map_or(bound, |n| n.min(bound));
        Self {
            settings,
            proc_dir: proc_dir.to_path_buf(),
            path: procfs::PathBuf::new(proc_dir),
            stat: FileBuf::default(),
            statm: FileBuf::default(),
            cmdline: FileBuf::default(),
            io: FileBuf::default(),
            clocks: procfs::is_own_pid_namespace(proc_dir),
            link: vec![0; EXE_LINK_MAX + 1].into_boxed_slice(),
            scope: encoded_scope(),
            users: Users::new(root),
            known: AHashMap::new(),
            generation: 0,
            files: AHashMap::new(),
            open_files: 0,
            max_open_files,
            unsettled: UnsettledBufs {
                status: FileBuf::default(),
                dirents: vec![MaybeUninit::uninit(); 32 * 1024],
            },
            listed: Vec::new(),
        }
    }

    /// Lists the PIDs in `<proc>` (and their directories' inodes) into `self.listed`, with
    /// no allocation per entry. `<proc>` is opened anew each time, in case something was
    /// mounted there since.
    fn list(&mut self) -> io::Result<()> {
        self.listed.clear();
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(&self.proc_dir, flags, Mode::empty())?;
        let mut dir = rustix::fs::RawDir::new(&fd, &mut self.unsettled.dirents);
        while let Some(entry) = dir.next() {
            let entry = entry?;
            let pid = procfs::parse_u64(entry.file_name().to_bytes())
                .and_then(|pid| u32::try_from(pid).ok());
            if let Some(pid) = pid {
                self.listed.push((pid, entry.ino()));
            }
        }
        Ok(())
    }
}

/// The scope of every process's metrics, as field 1 of a `ScopeMetrics`.
fn encoded_scope() -> Vec<u8> {
    let scope = super::scope(NAME);
    let mut buf = Vec::with_capacity(scope.encoded_len() + 4);
    prost::encoding::message::encode(1, &scope, &mut buf);
    buf
}

/// Host-wide values one scrape uses for every process.
struct Host {
    now: u64,
    btime_ns: u128,
    clk_tck: u64,
    page_size: u64,
    logical_cpus: u64,
    mem_total: Option<u64>,
}

impl Host {
    /// A process's start time (ns since the epoch) from `stat`'s `starttime`, and its age now.
    fn start_and_age(&self, starttime: u64) -> (u64, Duration) {
        let start_ns =
            self.btime_ns + u128::from(starttime) * 1_000_000_000 / u128::from(self.clk_tck);
        let start = u64::try_from(start_ns).unwrap_or(u64::MAX);
        (start, Duration::from_nanos(self.now.saturating_sub(start)))
    }
}

/// The outcome of reading one process.
enum Outcome {
    /// Its resource was written to the request.
    Emitted,
    Skipped,
    /// It exited while being read (counted); its files are closed.
    Vanished,
    /// Files kept from an earlier scrape belong to a process that has exited or (by its
    /// start time) is not the one now under the PID; nothing was counted yet.
    Stale,
}

impl Scraper for ProcessScraper {
    fn scrape(&mut self, ctx: &mut ScrapeContext<'_>, out: &mut RequestWriter) {
        if let Err(err) = self.list() {
            let dir = &self.proc_dir;
            ctx.errors.add(NAME, Reason::Read, false, || {
                format!("{}: {err}", dir.display())
            });
            return;
        }
        let stat = ctx.host_stat();
        let m = self.settings.metrics;
        let mem_total = if m.memory_utilization {
            std::fs::read(self.proc_dir.join("meminfo"))
                .ok()
                .and_then(|b| procfs::meminfo_bytes(&b, b"MemTotal"))
        } else {
            None
        };
        let host = Host {
            now: ctx.now,
            btime_ns: u128::from(stat.btime) * 1_000_000_000,
            clk_tck: ctx.kernel.clk_tck.max(1),
            page_size: ctx.kernel.page_size,
            logical_cpus: stat.logical_cpus.max(1),
            mem_total,
        };
        if self.settings.attributes.owner {
            self.users.refresh();
        }
        self.generation += 1;
        let listed = std::mem::take(&mut self.listed);
        for &(pid, ino) in &listed {
            self.read_process(pid, ino, &host, ctx, out);
        }
        self.listed = listed;
        let generation = self.generation;
        self.known.retain(|_, k| k.generation == generation);
        // Processes no longer listed: their files close here.
        self.files.retain(|_, f| f.generation == generation);
        self.open_files = self.files.values().map(ProcFiles::count).sum();
        ctx.open_files += self.open_files as u64;
    }

    fn read_only(&mut self, ctx: &mut ScrapeContext<'_>) {
        // What `scrape` reads for every process whose files it kept, in the same order.
        if self.list().is_err() {
            return;
        }
        ctx.host_stat();
        let (a, m) = (self.settings.attributes, self.settings.metrics);
        if m.memory_utilization {
            let _ = std::fs::read(self.proc_dir.join("meminfo"));
        }
        if a.owner {
            self.users.refresh();
        }
        for (pid, _) in &self.listed {
            let Some(files) = self.files.get(pid) else {
                continue;
            };
            if self.clocks {
                // Its own clock; a parent's is read once, as its own or before the child's.
                let _ = procfs::process_cpu_ns(*pid);
            }
            if a.owner && !files.idle {
                let _ = rustix::fs::fstat(&files.dir);
            }
            let full = !files.idle;
            let reads = [
                (&files.stat, &mut self.stat, full),
                (&files.cmdline, &mut self.cmdline, full),
                (&files.status, &mut self.unsettled.status, true),
                (&files.io, &mut self.io, full),
                (&files.statm, &mut self.statm, true),
            ];
            for (file, buf, read) in reads {
                if let (Some(file), true) = (file, read) {
                    let _ = buf.read_at(file);
                }
            }
            if let Some(fd) = &files.fd {
                let _ = rustix::fs::seek(fd, rustix::fs::SeekFrom::Start(0));
                let mut entries = rustix::fs::RawDir::new(fd, &mut self.unsettled.dirents);
                while let Some(Ok(_)) = entries.next() {}
            }
        }
    }
}

impl ProcessScraper {
    /// Reads one listed process through its kept files, or files opened now (kept when the
    /// budget allows).
    fn read_process(
        &mut self,
        pid: u32,
        ino: u64,
        host: &Host,
        ctx: &mut ScrapeContext<'_>,
        out: &mut RequestWriter,
    ) -> Outcome {
        let kept = self.files.remove(&pid);
        if let Some(files) = &kept {
            self.open_files = self.open_files.saturating_sub(files.count());
        }
        // Another inode: the PID now names another process; the old files close here.
        let kept = kept.filter(|f| f.ino == ino);
        let mut files = match kept {
            Some(files) => files,
            None => match self.open_process(pid, ino, ctx) {
                Some(files) => files,
                None => return Outcome::Skipped,
            },
        };
        files.generation = self.generation;
        let mut outcome = self.read_files(pid, &mut files, host, ctx, out);
        if matches!(outcome, Outcome::Stale) {
            // The PID is still listed, maybe for a new process: read it as a new one.
            drop(files);
            files = match self.open_process(pid, ino, ctx) {
                Some(files) => files,
                None => return Outcome::Skipped,
            };
            files.generation = self.generation;
            outcome = self.read_files(pid, &mut files, host, ctx, out);
        }
        match outcome {
            Outcome::Vanished | Outcome::Stale => Outcome::Skipped,
            outcome => {
                if files.keep {
                    self.open_files += files.count();
                    self.files.insert(pid, files);
                }
                outcome
            }
        }
    }

    /// Opens `<proc>/PID`, to be kept if the budget has room for it and its `stat`.
    fn open_process(
        &mut self,
        pid: u32,
        ino: u64,
        ctx: &mut ScrapeContext<'_>,
    ) -> Option<ProcFiles> {
        let keep = self.open_files + 2 <= self.max_open_files;
        if !keep {
            ctx.uncached_processes += 1;
        }
        self.path.set_pid(pid);
        match ProcFiles::open(self.path.file(""), ino, keep, self.generation) {
            Ok(files) => Some(files),
            Err(err) => {
                if procfs::is_gone(&err) {
                    ctx.errors
                        .add(NAME, Reason::Vanished, true, || format!("pid {pid}: {err}"));
                } else {
                    let mute = self.settings.mute_name;
                    ctx.errors
                        .add(NAME, Reason::Name, mute, || format!("pid {pid}: {err}"));
                }
                None
            }
        }
    }

    /// The CPU clock of the process under `pid` in this scrape ([`procfs::process_cpu_ns`]),
    /// read once per scrape when the process is known (for itself, or earlier as a parent),
    /// so that every use in one scrape compares the same reading. `None` when clocks are off
    /// (another PID namespace's `/proc`, or a fixture) or the process is gone.
    fn clock(&mut self, pid: u32) -> Option<u64> {
        if !self.clocks {
            return None;
        }
        let generation = self.generation;
        let Some(known) = self.known.get_mut(&pid) else {
            return procfs::process_cpu_ns(pid);
        };
        match known.clock {
            Some((read_in, ns)) if read_in == generation => ns,
            _ => {
                let ns = procfs::process_cpu_ns(pid);
                known.clock = Some((generation, ns));
                ns
            }
        }
    }

    /// Writes a process that has not run since its last full read from what that read found,
    /// reading only what can change without the process running: its memory (`statm`;
    /// reclaim shrinks it) and, when their metrics are on, `status` (pending signals) and
    /// `fd`. `None` when it ran, or its parent may have exited (which changes its `ppid`), or
    /// nothing is kept of it: then it is read in full.
    ///
    /// Everything else a full read takes comes from files that only the process's own
    /// threads change: `stat`'s CPU times are scaled to the run time the clock reads, so an
    /// unchanged clock means unchanged times, faults and thread count; `comm`, the command
    /// line (`setproctitle` writes the process's own memory), the owner (its credentials),
    /// `exe` (an `execve`) and the `io` counters (charged to the task doing the I/O) change
    /// only when it runs. Only a debugger writing into its memory changes the command line
    /// of a process that does not run; that shows once the process runs.
    fn read_idle(
        &mut self,
        pid: u32,
        files: &mut ProcFiles,
        own_clock: Option<u64>,
        host: &Host,
        ctx: &mut ScrapeContext<'_>,
        out: &mut RequestWriter,
    ) -> Option<Outcome> {
        let own_clock = own_clock?;
        let starttime = files.starttime?;
        let known = self.known.get(&pid)?;
        let steady = known.steady.as_deref()?;
        if known.starttime != starttime || steady.clock_ns != own_clock {
            return None;
        }
        let (ppid, parent_clock, filtered_out) =
            (steady.ppid, steady.parent_clock_ns, steady.filtered_out);
        // PIDs 0 (no parent in this namespace) and 1 (init, whose exit ends the namespace)
        // never change, nor does a kernel thread's (`kthreadd`, which never exits but runs
        // whenever a kernel thread is made); another parent that did not run has not exited.
        if !filtered_out && !steady.kthread && ppid > 1 {
            let parent = u32::try_from(ppid).ok()?;
            if parent_clock.is_none() || self.clock(parent) != parent_clock {
                return None;
            }
        }

        let s = Arc::clone(&self.settings);
        let m = s.metrics;
        let room = self.max_open_files.saturating_sub(self.open_files);
        let keep = files.keep && files.count() < room;
        let statm = if filtered_out {
            None
        } else {
            match read_file(&files.dir, &mut files.statm, "statm", keep, &mut self.statm)
                .map(procfs::parse_statm)
            {
                Ok(Some(pages)) => Some(pages),
                // Gone since its files were kept: read afresh, as the full read would.
                Err(err) if procfs::is_gone(&err) => return Some(Outcome::Stale),
                _ => return None,
            }
        };
        let known = self.known.get_mut(&pid)?;
        let steady = known.steady.as_deref()?;
        let mut outcome = Outcome::Skipped;
        if let Some(pages) = statm {
            let resource = known.resource.as_deref()?;
            let owner = steady
                .owner_uid
                .and_then(|uid| self.users.names.get(&uid).map(String::as_str));
            if resource.owner.as_deref() != owner {
                // The passwd file changed the owner's name: build the resource afresh.
                return None;
            }
            // The owner is not read for a process that did not run: it is the same.
            let mut ids = None;
            let fd_refusal = FdRefusal {
                stands: known.fd_refused.is_some_and(|r| self.generation < r.due),
                remembered: &mut known.fd_refused,
                ids: &mut ids,
            };
            let unsettled =
                read_unsettled(pid, m, files, room, &mut self.unsettled, fd_refusal, ctx);
            let Ok((status, fds)) = unsettled else {
                // Gone since its files were kept: read afresh, as the full read would.
                return Some(Outcome::Stale);
            };
            if let (Some(uid), None) = (steady.owner_uid, owner) {
                count_unknown_owner(ctx, pid, uid, s.mute_user);
            }
            let reading = Reading {
                stat: &steady.values,
                memory: Memory::of_pages(pages, host.page_size),
                io: steady.io,
                status,
                fds,
            };
            let emitted = write_process(
                out,
                host,
                m,
                &resource.bytes,
                &self.scope,
                reading,
                &mut known.cpu,
            );
            if emitted {
                outcome = Outcome::Emitted;
            }
            ctx.idle_processes += 1;
        }
        for noted in &steady.noted {
            ctx.errors
                .add(NAME, noted.reason, noted.muted, || noted.example(pid));
        }
        known.generation = self.generation;
        files.idle = true;
        Some(outcome)
    }

    fn read_files(
        &mut self,
        pid: u32,
        files: &mut ProcFiles,
        host: &Host,
        ctx: &mut ScrapeContext<'_>,
        out: &mut RequestWriter,
    ) -> Outcome {
        // The clocks before any file, so that a process running after them is read afresh
        // next scrape: its own, and its last known parent's (see `Steady::parent_clock_ns`).
        let own_clock = self.clock(pid);
        if let Some(outcome) = self.read_idle(pid, files, own_clock, host, ctx, out) {
            return outcome;
        }
        files.idle = false;
        let (last_ppid, remembers_refusal) = self.known.get(&pid).map_or((None, false), |k| {
            let refused = [k.io_refused, k.exe_refused, k.fd_refused]
                .iter()
                .any(Option::is_some);
            (k.ppid, refused)
        });
        let parent_clock = match last_ppid.and_then(|p| u32::try_from(p).ok()) {
            Some(parent) if parent > 1 => self.clock(parent),
            _ => None,
        };

        let s = Arc::clone(&self.settings);
        let (a, m) = (s.attributes, s.metrics);
        self.path.set_pid(pid);
        // Descriptors this process may keep: what the others leave of the budget.
        let room = self.max_open_files.saturating_sub(self.open_files);
        let may_keep = |files: &ProcFiles| files.keep && files.count() < room;
        // Errors counted by this read, to count again while it is reused (`read_idle`), in
        // the last read's vector once it is at hand.
        let mut noted: Vec<Noted> = Vec::new();
        macro_rules! gone_or {
            ($err:expr, $reason:expr, $muted:expr, $what:expr) => {{
                let err = $err;
                if procfs::is_gone(&err) {
                    ctx.errors
                        .add(NAME, Reason::Vanished, true, || format!("pid {pid}: {err}"));
                    return Outcome::Vanished;
                }
                let error = Noted {
                    reason: $reason,
                    muted: $muted,
                    what: $what,
                    cause: Cause::of(&err),
                };
                note(ctx, &mut noted, pid, error);
            }};
        }

        // The owner before `stat`: `fstat` of the directory of an exited process succeeds
        // (as root's), and reading `stat` afterwards tells that it exited. Also needed to
        // tell whether a refusal still stands.
        let dir_stat = (a.owner || remembers_refusal).then(|| rustix::fs::fstat(&files.dir));
        let mut ids = match &dir_stat {
            Some(Ok(st)) => Some((st.st_uid, st.st_gid)),
            _ => None,
        };

        let keep_stat = may_keep(files);
        let stat_bytes = match read_file(
            &files.dir,
            &mut files.stat,
            "stat",
            keep_stat,
            &mut self.stat,
        ) {
            Ok(bytes) => bytes,
            Err(err) if files.starttime.is_some() && procfs::is_gone(&err) => {
                return Outcome::Stale
            }
            Err(err) => {
                gone_or!(err, Reason::Name, s.mute_name, "stat");
                return Outcome::Skipped;
            }
        };
        let Some(stat) = procfs::parse_pid_stat(stat_bytes) else {
            // A zombie's stat is complete, so an unparsable one is not a race: say so.
            ctx.errors.add(NAME, Reason::Name, s.mute_name, || {
                format!("pid {pid}: malformed stat")
            });
            return Outcome::Skipped;
        };
        if files.starttime.is_some_and(|t| t != stat.starttime) {
            return Outcome::Stale;
        }
        files.starttime = Some(stat.starttime);
        // The parent's clock as read before `stat`: the one read above if the parent is the
        // same, or else one read earlier in this scrape (a parent listed before the child).
        let parent_clock = if last_ppid == Some(stat.ppid) {
            parent_clock
        } else {
            let generation = self.generation;
            u32::try_from(stat.ppid)
                .ok()
                .filter(|&parent| parent > 1)
                .and_then(|parent| self.known.get(&parent)?.clock)
                .and_then(|(read_in, ns)| ns.filter(|_| read_in == generation))
        };

        let known = match self.known.entry(pid) {
            Entry::Occupied(entry) => {
                let known = entry.into_mut();
                if known.starttime != stat.starttime {
                    *known = Known::new(stat.starttime, self.generation);
                }
                known
            }
            Entry::Vacant(entry) => entry.insert(Known::new(stat.starttime, self.generation)),
        };
        known.generation = self.generation;
        known.clock = Some((self.generation, own_clock));
        known.ppid = Some(stat.ppid);
        // Its allocation is reused, so that reading a process that keeps running allocates
        // nothing.
        let mut spare = known.steady.take();
        if let Some(spare) = spare.as_mut() {
            noted = std::mem::take(&mut spare.noted);
            noted.clear();
        }
        let values = StatValues::of(&stat);
        // Reusable while neither clock moves; the parent's only if it was read before
        // `stat`, so that an exit after it shows as a change.
        let mut steady = own_clock.map(|clock_ns| Steady {
            clock_ns,
            parent_clock_ns: parent_clock,
            ppid: stat.ppid,
            kthread: stat.flags & procfs::PF_KTHREAD != 0,
            values,
            io: None,
            owner_uid: None,
            filtered_out: false,
            noted: Vec::new(),
        });

        // Kernel threads and zombies have no memory of their own: no executable (that is
        // not an error) and an empty `cmdline`, which the kernel answers without looking, so
        // it is not read either.
        let no_mm = stat.flags & procfs::PF_KTHREAD != 0 || stat.state == b'Z';

        // The name is `comm`, extended from the command as gopsutil does when the kernel
        // truncated it, so filters see the same names as with the Collector.
        let needs_cmdline = !no_mm && (a.command || a.command_line || stat.comm.len() >= COMM_MAX);
        let cmdline: &[u8] = if needs_cmdline {
            let keep = may_keep(files);
            match read_file(
                &files.dir,
                &mut files.cmdline,
                "cmdline",
                keep,
                &mut self.cmdline,
            ) {
                Ok(bytes) => bytes,
                Err(err) => {
                    gone_or!(err, Reason::Name, s.mute_name, "cmdline");
                    &[]
                }
            }
        } else {
            &[]
        };
        let name = executable_name(stat.comm, cmdline);
        if s.include.as_ref().is_some_and(|f| !f.matches(&name))
            || s.exclude.as_ref().is_some_and(|f| f.matches(&name))
        {
            let steady = steady.map(|steady| Steady {
                filtered_out: true,
                noted,
                ..steady
            });
            known.steady = boxed(steady, spare);
            return Outcome::Skipped;
        }

        let (_, age) = host.start_and_age(stat.starttime);
        if !s.scrape_process_delay.is_zero() && age < s.scrape_process_delay {
            return Outcome::Skipped;
        }

        // The exe link is read when the process is first seen and again when its `comm`
        // changes (an exec); a failed read is not kept, and is tried again next scrape,
        // a refusal when due (`Refusal`).
        let wants_exe = a.executable_path && !no_mm;
        let exe_is_current = known
            .exe
            .as_ref()
            .is_some_and(|(comm, _)| **comm == *stat.comm);
        if wants_exe && !exe_is_current {
            if let Some(err) = Refusal::standing(known.exe_refused, ids, self.generation) {
                gone_or!(err, Reason::Exe, s.mute_exe, "exe");
            } else {
                let read = rustix::fs::readlinkat_raw(&files.dir, "exe", &mut self.link[..])
                    .map_err(io::Error::from);
                known.exe_refused =
                    Refusal::remember(&read, pid, &files.dir, &mut ids, self.generation);
                match read {
                    Ok(len) => {
                        let target = self.link.get(..len).unwrap_or_default();
                        let exe = String::from_utf8_lossy(target).into_owned();
                        known.exe = Some((stat.comm.into(), exe));
                    }
                    Err(err) => {
                        known.exe = None;
                        gone_or!(err, Reason::Exe, s.mute_exe, "exe");
                    }
                }
            }
        }
        let exe = known
            .exe
            .as_ref()
            .filter(|_| wants_exe)
            .map(|(_, e)| e.as_str());

        // The owner is the uid owning /proc/PID (`fstat`, which procfs answers from the
        // process's credentials of now), not `status`'s real uid: generating `status` costs
        // more than all the other files of a process together.
        let owner_uid = match dir_stat.filter(|_| a.owner) {
            Some(Ok(st)) => Some(st.st_uid),
            Some(Err(err)) => {
                gone_or!(io::Error::from(err), Reason::User, s.mute_user, "owner");
                None
            }
            None => None,
        };

        // Not kept for reuse: `read_idle` reads them too.
        let fd_refusal = FdRefusal {
            stands: Refusal::standing(known.fd_refused, ids, self.generation).is_some(),
            remembered: &mut known.fd_refused,
            ids: &mut ids,
        };
        let unsettled = read_unsettled(pid, m, files, room, &mut self.unsettled, fd_refusal, ctx);
        let (status, fds) = match unsettled {
            Ok(read) => read,
            Err(err) => {
                ctx.errors
                    .add(NAME, Reason::Vanished, true, || format!("pid {pid}: {err}"));
                return Outcome::Vanished;
            }
        };
        let owner = owner_uid.and_then(|uid| {
            let name = self.users.names.get(&uid).map(String::as_str);
            if name.is_none() {
                count_unknown_owner(ctx, pid, uid, s.mute_user);
            }
            name
        });

        let io = if m.disk_io || m.disk_operations {
            let read = match Refusal::standing(known.io_refused, ids, self.generation) {
                Some(err) => Err(err),
                None => {
                    let keep = may_keep(files);
                    let read = read_file(&files.dir, &mut files.io, "io", keep, &mut self.io);
                    known.io_refused =
                        Refusal::remember(&read, pid, &files.dir, &mut ids, self.generation);
                    read
                }
            };
            match read.map(procfs::parse_pid_io) {
                Ok(Some(io)) => Some(io),
                Ok(None) => {
                    let error = Noted {
                        reason: Reason::Io,
                        muted: s.mute_io,
                        what: "io",
                        cause: Cause::Text("no counters"),
                    };
                    note(ctx, &mut noted, pid, error);
                    None
                }
                Err(err) => {
                    gone_or!(err, Reason::Io, s.mute_io, "io");
                    None
                }
            }
        } else {
            None
        };

        // Memory from `statm`, as gopsutil (the Collector) reads it, and as `read_idle` does.
        let mut memory = Memory {
            vsize: stat.vsize,
            rss: stat.rss_pages.saturating_mul(host.page_size),
        };
        if m.memory_usage || m.memory_virtual || m.memory_utilization {
            let keep = may_keep(files);
            let read = read_file(&files.dir, &mut files.statm, "statm", keep, &mut self.statm);
            match read.map(procfs::parse_statm) {
                Ok(Some(pages)) => memory = Memory::of_pages(pages, host.page_size),
                Err(err) if procfs::is_gone(&err) => {
                    ctx.errors
                        .add(NAME, Reason::Vanished, true, || format!("pid {pid}: {err}"));
                    return Outcome::Vanished;
                }
                // Readable with `stat`, so not expected; `stat` has the same counters, its
                // resident set approximate.
                _ => steady = None,
            }
        }

        // Everything is read; write the resource and its metrics. The resource is encoded
        // again only when something it is built from changed.
        let inputs = ResourceInputs {
            pid,
            ppid: stat.ppid,
            comm: stat.comm,
            cmdline,
            name: &name,
            exe,
            owner,
        };
        let resource = known.resource.get_or_insert_with(Box::default);
        if resource.bytes.is_empty() || !resource.matches(&inputs) {
            resource.rebuild(a, &inputs);
        }
        let reading = Reading {
            stat: &values,
            memory,
            io,
            status,
            fds,
        };
        let emitted = write_process(
            out,
            host,
            m,
            &resource.bytes,
            &self.scope,
            reading,
            &mut known.cpu,
        );
        if !emitted {
            // No metric had a point (e.g. only utilization on, at the first scrape).
            return Outcome::Skipped;
        }
        let steady = steady.map(|steady| Steady {
            io,
            owner_uid,
            noted,
            ..steady
        });
        known.steady = boxed(steady, spare);
        Outcome::Emitted
    }
}

/// What can change without the process running, so is read when it is reused as on a full
/// read: `status` (a signal can stay pending) and the count of `fd`, as far as their metrics
/// are on. `Err` when the process is gone; other failures are counted and leave the value
/// out.
fn read_unsettled(
    pid: u32,
    m: Metrics,
    files: &mut ProcFiles,
    room: usize,
    bufs: &mut UnsettledBufs,
    fd_refusal: FdRefusal<'_>,
    ctx: &mut ScrapeContext<'_>,
) -> io::Result<(Option<procfs::PidStatus>, Option<u64>)> {
    let may_keep = |files: &ProcFiles| files.keep && files.count() < room;
    let status = if m.context_switches || m.signals_pending {
        let keep = may_keep(files);
        match read_file(
            &files.dir,
            &mut files.status,
            "status",
            keep,
            &mut bufs.status,
        ) {
            Ok(bytes) => Some(procfs::parse_pid_status(bytes)),
            Err(err) if procfs::is_gone(&err) => return Err(err),
            Err(err) => {
                ctx.errors.add(NAME, Reason::Status, false, || {
                    format!("pid {pid}: status: {err}")
                });
                None
            }
        }
    } else {
        None
    };
    let fds = if m.open_file_descriptors {
        let standing = fd_refusal.remembered.filter(|_| fd_refusal.stands);
        let counted = match standing {
            Some(refusal) => Err(refusal.error()),
            None => {
                let keep = may_keep(files);
                let counted = count_fds(&files.dir, &mut files.fd, keep, &mut bufs.dirents);
                *fd_refusal.remembered =
                    Refusal::remember(&counted, pid, &files.dir, fd_refusal.ids, files.generation);
                counted
            }
        };
        match counted {
            Ok(n) => Some(n),
            Err(err) if procfs::is_gone(&err) => return Err(err),
            Err(err) => {
                ctx.errors
                    .add(NAME, Reason::Fd, false, || format!("pid {pid}: fd: {err}"));
                None
            }
        }
    } else {
        None
    };
    Ok((status, fds))
}

/// A process's memory, in bytes.
#[derive(Debug, Clone, Copy)]
struct Memory {
    vsize: u64,
    rss: u64,
}

impl Memory {
    /// From `statm`'s size and resident set, in pages.
    fn of_pages((size, resident): (u64, u64), page_size: u64) -> Self {
        Self {
            vsize: size.saturating_mul(page_size),
            rss: resident.saturating_mul(page_size),
        }
    }
}

/// What a process's metrics are written from, read in full or reused.
struct Reading<'a> {
    stat: &'a StatValues,
    memory: Memory,
    io: Option<procfs::PidIo>,
    status: Option<procfs::PidStatus>,
    fds: Option<u64>,
}

/// Writes one process's `ResourceMetrics` (its encoded `resource` and the enabled metrics);
/// false, with nothing written, when no metric had a point.
fn write_process(
    out: &mut RequestWriter,
    host: &Host,
    m: Metrics,
    resource: &[u8],
    scope: &[u8],
    reading: Reading<'_>,
    cpu: &mut Option<CpuSample>,
) -> bool {
    let Reading {
        stat,
        memory,
        io,
        status,
        fds,
    } = reading;
    let (start, age) = host.start_and_age(stat.starttime);
    let buf = out.buf();
    let rm_at = buf.len();
    let rm = encode::begin_wide(buf, 1);
    buf.extend_from_slice(resource);
    let sm = encode::begin_wide(buf, 2);
    buf.extend_from_slice(scope);
    let metrics_at = buf.len();

    let now = host.now;
    let tick = host.clk_tck as f64;
    let (user, system, wait) = (
        stat.utime as f64 / tick,
        stat.stime as f64 / tick,
        stat.blkio_ticks as f64 / tick,
    );
    let mut add = |def: &MetricDef, points: &[(f64, Option<(&'static str, &'static str)>)]| {
        out.metric(2, def, start, now, points);
    };
    let state = |v: &'static str| Some(("state", v));
    let direction = |v: &'static str| Some(("direction", v));
    let kind = |v: &'static str| Some(("type", v));
    if m.cpu_time {
        add(
            &metadata::PROCESS_CPU_TIME,
            &[
                (user, state("user")),
                (system, state("system")),
                (wait, state("wait")),
            ],
        );
    }
    if m.cpu_utilization {
        let sample = CpuSample {
            time: now,
            user,
            system,
            wait,
        };
        // `cpu` was reset if the PID has a new process since.
        if let Some(before) = cpu.replace(sample) {
            let elapsed = now.saturating_sub(before.time) as f64 / 1e9;
            if elapsed > 0.0 {
                let scale = elapsed * host.logical_cpus as f64;
                add(
                    &metadata::PROCESS_CPU_UTILIZATION,
                    &[
                        ((user - before.user) / scale, state("user")),
                        ((system - before.system) / scale, state("system")),
                        ((wait - before.wait) / scale, state("wait")),
                    ],
                );
            }
        }
    }
    if m.memory_usage {
        add(
            &metadata::PROCESS_MEMORY_USAGE,
            &[(memory.rss as f64, None)],
        );
    }
    if m.memory_virtual {
        add(
            &metadata::PROCESS_MEMORY_VIRTUAL,
            &[(memory.vsize as f64, None)],
        );
    }
    if let (true, Some(total)) = (m.memory_utilization, host.mem_total.filter(|t| *t > 0)) {
        // A percentage (0-100), as the Collector reports it despite the unit "1".
        let percent = 100.0 * memory.rss as f64 / total as f64;
        add(&metadata::PROCESS_MEMORY_UTILIZATION, &[(percent, None)]);
    }
    if let Some(io) = io {
        if m.disk_io {
            add(
                &metadata::PROCESS_DISK_IO,
                &[
                    (io.read_bytes as f64, direction("read")),
                    (io.write_bytes as f64, direction("write")),
                ],
            );
        }
        if m.disk_operations {
            add(
                &metadata::PROCESS_DISK_OPERATIONS,
                &[
                    (io.syscr as f64, direction("read")),
                    (io.syscw as f64, direction("write")),
                ],
            );
        }
    }
    if m.paging_faults {
        add(
            &metadata::PROCESS_PAGING_FAULTS,
            &[
                (stat.majflt as f64, kind("major")),
                (stat.minflt as f64, kind("minor")),
            ],
        );
    }
    if let (true, Some(status)) = (m.signals_pending, status) {
        let pending = f64::from(status.shared_pending.count_ones());
        add(&metadata::PROCESS_SIGNALS_PENDING, &[(pending, None)]);
    }
    if m.threads {
        add(
            &metadata::PROCESS_THREADS,
            &[(stat.num_threads as f64, None)],
        );
    }
    if let Some(fds) = fds {
        add(
            &metadata::PROCESS_OPEN_FILE_DESCRIPTORS,
            &[(fds as f64, None)],
        );
    }
    if let (true, Some(status)) = (m.context_switches, status) {
        add(
            &metadata::PROCESS_CONTEXT_SWITCHES,
            &[
                (
                    status.nonvoluntary_ctxt_switches as f64,
                    kind("involuntary"),
                ),
                (status.voluntary_ctxt_switches as f64, kind("voluntary")),
            ],
        );
    }
    if m.uptime {
        add(&metadata::PROCESS_UPTIME, &[(age.as_secs_f64(), None)]);
    }

    let buf = out.buf();
    if buf.len() == metrics_at {
        buf.truncate(rm_at);
        return false;
    }
    encode::string_field(buf, 3, SCHEMA_URL);
    encode::end(buf, sm);
    encode::string_field(buf, 3, SCHEMA_URL);
    encode::end(buf, rm);
    true
}

/// `comm`, or the base name of the command when `comm` is its truncated prefix; borrowed
/// unless it has bytes that are not UTF-8, so a process filtered out costs no allocation.
fn executable_name<'a>(comm: &'a [u8], cmdline: &'a [u8]) -> Cow<'a, str> {
    if comm.len() >= COMM_MAX {
        let first = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        let base = first.rsplit(|&b| b == b'/').next().unwrap_or_default();
        if base.starts_with(comm) {
            return String::from_utf8_lossy(base);
        }
    }
    String::from_utf8_lossy(comm)
}
