//! The `mde-isolation-operator` binary: `run` the operator, or print the `crd`.

use std::process::ExitCode;

use clap::Parser;
use mde_isolation_operator::config::{Cli, Command};
use mde_isolation_operator::{crd, run, telemetry};

/// glibc arenas the allocator may use. By default glibc gives each thread that contends for the
/// heap an arena of its own (up to eight per core), and memory freed in one arena is not reused by
/// the others; tokio moves tasks between worker threads, so the transient peaks of every arena
/// stay resident. One arena: every thread reuses what any other freed. Measured with 10,000
/// resources (the benchmark's `rss10k` run, 2-core Intel Xeon, a build with
/// `--features alloc-stats`, the view and memory as of this commit): peak RSS 84.5 MiB with two
/// arenas, 75.8 MiB with one. (Earlier, with 5,000 resources: 78.7 MiB with glibc's default,
/// 75.6 MiB with two.) The two worker threads contend for the one arena's lock; the run's CPU
/// time did not grow (47.1 s with two, 43.7 s with one and the threshold below).
const MALLOC_ARENAS: i32 = 1;

/// Allocations from this size up get pages of their own (mmap), returned to the system when
/// freed. glibc's default starts here too but raises the threshold to the size of every such
/// block freed (up to 32 MiB): after the first large response body or page of objects, those are
/// carved out of the heap, where the long-lived objects allocated around them keep the freed
/// space from being returned. Setting it explicitly turns that adjustment off. Measured as above
/// (one arena): peak RSS 75.8 MiB with the adjusting threshold, 68.3 MiB with this fixed one;
/// a new process over the 10,000 settled resources 61.7 MiB and 58.9 MiB.
const MMAP_THRESHOLD: i32 = 128 * 1024;

fn main() -> ExitCode {
    tune_malloc();
    #[cfg(feature = "alloc-stats")]
    alloc_stats::report_every(std::time::Duration::from_secs(1));
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { kind } => {
            print!("{}", crd::crd_yaml_of(kind));
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("mde-isolation-operator: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async move {
                telemetry::init(args.log_format);
                // kube and reqwest both use rustls; pick the ring provider once for the process.
                let _ = rustls::crypto::ring::default_provider().install_default();
                match run::run(*args).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "operator failed");
                        eprintln!("mde-isolation-operator: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

/// Caps glibc's arenas at [`MALLOC_ARENAS`] and fixes its mmap threshold at [`MMAP_THRESHOLD`];
/// called before any other thread exists. An explicit `MALLOC_ARENA_MAX` or
/// `MALLOC_MMAP_THRESHOLD_` in the environment wins (glibc reads them at the first allocation).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    // SAFETY: mallopt only tunes the allocator, and no other thread is running yet to race with
    // the change. A refusal (return value 0) leaves glibc's default, which is correct too.
    unsafe {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Other C libraries have neither setting.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

/// Diagnosis (`--features alloc-stats`): the system allocator, counting the bytes held.
#[cfg(feature = "alloc-stats")]
mod alloc_stats {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static LIVE: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);

    struct Counting;

    fn add(n: usize) {
        let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }

    // SAFETY: every call is forwarded to the system allocator unchanged; only counters move.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                add(layout.size());
            }
            p
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                add(layout.size());
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
                add(new_size);
            }
            p
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn malloc_info() -> String {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let m = unsafe { libc::mallinfo2() };
        format!(
            " in-use={}KiB free={}KiB mmap={}KiB",
            m.uordblks / 1024,
            m.fordblks / 1024,
            m.hblkhd / 1024
        )
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn malloc_info() -> String {
        String::new()
    }

    /// Prints live and peak heap bytes and VmRSS (KiB) to stderr every `period`, and (glibc)
    /// what malloc holds: `in-use` (the chunks of live allocations, headers and rounding
    /// included), `free` (free chunks kept in the heap) and `mmap` (large blocks of their own).
    pub fn report_every(period: std::time::Duration) {
        std::thread::spawn(move || {
            loop {
                let rss = std::fs::read_to_string("/proc/self/status")
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .map(|v| v.trim().to_string())
                    })
                    .unwrap_or_default();
                eprintln!(
                    "alloc-stats live={}KiB peak={}KiB rss={rss}{}",
                    LIVE.load(Ordering::Relaxed) / 1024,
                    PEAK.load(Ordering::Relaxed) / 1024,
                    malloc_info(),
                );
                std::thread::sleep(period);
            }
        });
    }
}
