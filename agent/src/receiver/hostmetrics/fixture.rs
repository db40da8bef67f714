//! A fake `/proc` (plus `/etc/passwd`) written into a directory, for tests and the bench:
//! the scrapers read it through `root_path` exactly as they read a host's.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use super::procfs::PidIo;

/// Boot time of the fixture host, seconds since the epoch.
pub const BTIME: u64 = 1_700_000_000;
/// Logical CPUs of the fixture host.
pub const CPUS: usize = 2;
/// `MemTotal` of the fixture host, in kB.
pub const MEM_TOTAL_KB: u64 = 8 * 1024 * 1024;

/// One fake process.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: u32,
    pub ppid: i64,
    /// The `comm` field of `stat` (raw bytes; may hold spaces, parentheses, non-UTF-8).
    pub comm: Vec<u8>,
    /// Raw `cmdline`: NUL-separated arguments.
    pub cmdline: Vec<u8>,
    /// Target of the `exe` link; `None` makes it unreadable (a directory, which `readlink`
    /// refuses, as the kernel refuses a link the agent has no ptrace rights on).
    pub exe: Option<String>,
    pub flags: u64,
    pub utime: u64,
    pub stime: u64,
    pub blkio_ticks: u64,
    pub starttime: u64,
    /// In bytes, a multiple of 4 KiB (`statm` has it in pages).
    pub vsize: u64,
    pub rss_pages: u64,
    pub num_threads: u64,
    pub minflt: u64,
    pub majflt: u64,
    /// `None` makes `io` unreadable (a directory, so it fails even for root).
    pub io: Option<PidIo>,
    pub voluntary_ctxt_switches: u64,
    pub nonvoluntary_ctxt_switches: u64,
    pub shared_pending: u64,
    pub fds: usize,
}

impl Process {
    /// A plain process running `/usr/bin/<name> <args>`.
    pub fn new(pid: u32, name: &str, args: &[&str]) -> Self {
        let mut cmdline = format!("/usr/bin/{name}").into_bytes();
        for arg in args {
            cmdline.push(0);
            cmdline.extend_from_slice(arg.as_bytes());
        }
        cmdline.push(0);
        Self {
            pid,
            ppid: 1,
            comm: name.as_bytes().iter().take(15).copied().collect(),
            cmdline,
            exe: Some(format!("/usr/bin/{name}")),
            flags: 0x0040_0100,
            utime: 250,
            stime: 125,
            blkio_ticks: 5,
            starttime: 10_000,
            vsize: 10 * 1024 * 1024,
            rss_pages: 300,
            num_threads: 4,
            minflt: 11,
            majflt: 3,
            io: Some(PidIo {
                syscr: 7,
                syscw: 9,
                read_bytes: 4096,
                write_bytes: 8192,
            }),
            voluntary_ctxt_switches: 21,
            nonvoluntary_ctxt_switches: 2,
            shared_pending: 0,
            fds: 3,
        }
    }
}

/// Writes `<root>/proc` with host files and `processes`, and `<root>/etc/passwd` naming
/// `app` the user who runs the test: the scraper takes a process's owner from the owner of
/// its `/proc/PID` directory, which here is whoever wrote it.
pub fn write(root: &Path, processes: &[Process]) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let proc_dir = root.join("proc");
    std::fs::create_dir_all(proc_dir.join("net"))?;
    std::fs::create_dir_all(root.join("etc"))?;
    let uid = std::fs::metadata(&proc_dir)?.uid();
    std::fs::write(
        root.join("etc/passwd"),
        format!("app:x:{uid}:{uid}::/home/app:/bin/sh\nroot:x:0:0:root:/root:/bin/sh\n"),
    )?;
    let mut stat = String::from("cpu  300 20 100 5000 40 1 2 3 0 0\n");
    for cpu in 0..CPUS {
        let _ = writeln!(stat, "cpu{cpu} 150 10 50 2500 20 1 1 {} 0 0", cpu + 1);
    }
    let _ = write!(stat, "intr 1\nctxt 2\nbtime {BTIME}\nprocesses 3\n");
    std::fs::write(proc_dir.join("stat"), stat)?;
    std::fs::write(
        proc_dir.join("meminfo"),
        format!(
            "MemTotal:       {MEM_TOTAL_KB} kB\nMemFree:         1000000 kB\nMemAvailable:    5000000 kB\nBuffers:           100000 kB\nCached:          2000000 kB\nSReclaimable:     200000 kB\nSUnreclaim:        50000 kB\n"
        ),
    )?;
    std::fs::write(proc_dir.join("loadavg"), "0.50 1.25 2.00 2/300 4242\n")?;
    std::fs::write(
        proc_dir.join("net/dev"),
        "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:  1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0\n  eth0: 50000     400    1    2    0     0          0         0    20000     300    3    4    0     0       0          0\n",
    )?;
    for p in processes {
        write_process(&proc_dir, p)?;
    }
    Ok(())
}

fn write_process(proc_dir: &Path, p: &Process) -> io::Result<()> {
    let dir = proc_dir.join(p.pid.to_string());
    std::fs::create_dir_all(&dir)?;
    let mut stat = format!("{} (", p.pid).into_bytes();
    stat.extend_from_slice(&p.comm);
    stat.extend_from_slice(
        format!(
            ") S {} {} {} 0 -1 {} {} 0 {} 0 {} {} 0 0 20 0 {} 0 {} {} {} 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 {} 0 0 0 0 0 0 0 0 0 0\n",
            p.ppid, p.pid, p.pid, p.flags, p.minflt, p.majflt, p.utime, p.stime,
            p.num_threads, p.starttime, p.vsize, p.rss_pages, p.blkio_ticks
        )
        .as_bytes(),
    );
    std::fs::write(dir.join("stat"), stat)?;
    // Pages of 4 KiB, as the tests' `KernelConstants` say.
    let statm = format!("{} {} 0 0 0 0 0\n", p.vsize / 4096, p.rss_pages);
    std::fs::write(dir.join("statm"), statm)?;
    let mut status = String::from("Name:\tx\nUmask:\t0022\nState:\tS (sleeping)\n");
    let _ = write!(
        status,
        "Tgid:\t{pid}\nPid:\t{pid}\nPPid:\t{}\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nThreads:\t{}\nSigQ:\t0/63704\nSigPnd:\t0000000000000000\nShdPnd:\t{:016x}\nvoluntary_ctxt_switches:\t{}\nnonvoluntary_ctxt_switches:\t{}\n",
        p.ppid,
        p.num_threads,
        p.shared_pending,
        p.voluntary_ctxt_switches,
        p.nonvoluntary_ctxt_switches,
        pid = p.pid,
    );
    std::fs::write(dir.join("status"), status)?;
    std::fs::write(dir.join("cmdline"), &p.cmdline)?;
    let link = dir.join("exe");
    match &p.exe {
        Some(exe) => {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(exe, link)?;
        }
        None => std::fs::create_dir_all(link)?,
    }
    match &p.io {
        Some(io) => std::fs::write(
            dir.join("io"),
            format!(
                "rchar: 1\nwchar: 2\nsyscr: {}\nsyscw: {}\nread_bytes: {}\nwrite_bytes: {}\ncancelled_write_bytes: 0\n",
                io.syscr, io.syscw, io.read_bytes, io.write_bytes
            ),
        )?,
        None => std::fs::create_dir_all(dir.join("io"))?,
    }
    let fd = dir.join("fd");
    std::fs::create_dir_all(&fd)?;
    for i in 0..p.fds {
        std::fs::write(fd.join(i.to_string()), "")?;
    }
    Ok(())
}

/// `n` varied processes (pids from 1000), for the bench: a mix of names, argument lengths
/// and kernel threads, like a busy node.
pub fn many(n: usize) -> Vec<Process> {
    let names = [
        "java",
        "python3",
        "nginx",
        "postgres",
        "containerd-shim",
        "kworker/0:1",
    ];
    (0..n)
        .map(|i| {
            let name = names[i % names.len()];
            let arg = format!("--instance={i}");
            let mut p = Process::new(1000 + i as u32, name, &["-Xmx512m", &arg, "serve"]);
            if name.starts_with("kworker") {
                p.flags |= super::procfs::PF_KTHREAD;
                p.cmdline.clear();
                p.exe = None;
            }
            p.utime = 100 + i as u64;
            p
        })
        .collect()
}
