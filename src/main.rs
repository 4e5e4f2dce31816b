//! The `balancer` command: parse the command line, set up logging, run until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod packaging;

// mimalloc rather than glibc's malloc: a request allocates and frees a few dozen small objects
// and, on a parked keep-alive connection, hyper's two 8 KiB buffers; glibc serves 8 KiB from its
// bins (~150 instructions a call, and freed memory stays in the process), mimalloc from
// per-thread size-class pages, and returns idle pages to the system. Its 2.x line (the `v2`
// feature) rather than 3.x: a `Connection: close` client frees every block of a page often (its
// two 8 KiB buffers), and 3.x gives such a page back at once, so about one connection in three
// set up a fresh page; 2.x keeps a retired page for a few rounds (callgrind, close: 39.4k -> 38.9k
// instructions per request; 10,000 idle connections 3.9 -> 3.4 KB each).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// mimalloc behind Rust's allocator interface, asking for alignment only when the layout needs
/// more than every block has. The `mimalloc` crate calls `mi_malloc_aligned` for every layout,
/// and mimalloc (measured on 3.x) serves any block over 1 KiB that is not a power of two
/// through its over-allocating aligned path (+alignment bytes, a slower free): three of a
/// request's allocations (its handler's state, hyper's buffers), about 300 instructions each.
struct MiMalloc;

/// The alignment of every mimalloc block of at least this size (`MI_MAX_ALIGN_SIZE`).
const MI_MIN_ALIGN: usize = 16;

fn plain(align: usize, size: usize) -> bool {
    align <= MI_MIN_ALIGN && align <= size
}

/// Blocks of 7 to 8 KiB, in practice hyper's read and write buffers (two per HTTP/1.1 client
/// connection), are asked for one byte over 8 KiB. mimalloc then serves them from a medium
/// page (10 KiB blocks, about 50 to a 512 KiB page) instead of a small one (8 KiB blocks, 8 to
/// a 64 KiB page). Connections come and go, so a small page of eight such buffers empties
/// often, and mimalloc frees an empty page at once unless it is the only one of its size. A
/// new page then has to be set up for the next connection: with `Connection: close` at 16
/// connections, one new page per 3.2 requests (gdb on `mi_page_fresh_alloc`). One medium page
/// holds every buffer of such a load and is retired, not freed, when it empties. The price is
/// 2 KiB per buffer while a connection is busy; a parked connection holds none.
const PAGE_CHURN: std::ops::RangeInclusive<usize> = 7 * 1024 + 1..=8 * 1024;

#[inline]
fn block_size(size: usize) -> usize {
    if PAGE_CHURN.contains(&size) {
        8 * 1024 + 1
    } else {
        size
    }
}

// SAFETY: each call hands mimalloc a layout Rust's allocator contract made valid, and frees
// only what mimalloc allocated; the plain calls are used only where their guaranteed
// alignment covers the layout's.
unsafe impl std::alloc::GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        if plain(layout.align(), layout.size()) {
            mi_malloc(block_size(layout.size())).cast()
        } else {
            mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        if plain(layout.align(), layout.size()) {
            mi_zalloc(block_size(layout.size())).cast()
        } else {
            mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        if plain(layout.align(), new_size) {
            mi_realloc(ptr.cast(), block_size(new_size)).cast()
        } else {
            mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

#[derive(Parser)]
#[command(
    name = "balancer",
    version,
    about = "A Layer-7 load balancer and reverse proxy"
)]
struct Cli {
    /// Configuration file.
    // The hint makes shell completions offer file names here.
    #[arg(
        long,
        short = 'c',
        global = true,
        default_value = "balancer.toml",
        value_hint = clap::ValueHint::FilePath
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration: print "ok" (and any warnings) and exit 0, or every error
    /// and exit 1.
    Check(CheckArgs),
    /// Print a shell completion script for SHELL on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout.
    Manpage,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Print what a reload to this config would change, instead of "ok".
    #[arg(long)]
    diff: bool,
    /// The running balancer's admin API to compare with (pools and backends only); the
    /// default is the config's own [admin] bind.
    #[arg(long, value_name = "ADMIN_URL", requires = "diff")]
    against: Option<String>,
    /// Another config file to compare with, completely.
    #[arg(
        long,
        value_name = "PATH",
        requires = "diff",
        conflicts_with = "against"
    )]
    against_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    small_pages();
    let cli = Cli::parse();
    // Packaging helpers: generated from the parser itself, so they never drift from the real
    // command line, and they need no config file (a package build has none).
    match &cli.command {
        Some(Command::Completions { shell }) => {
            return packaging::completions(Cli::command(), *shell)
        }
        Some(Command::Manpage) => return packaging::manpage(Cli::command()),
        _ => {}
    }
    if let Some(Command::Check(args)) = cli.command {
        use balancer::check::Against;
        let against = match (args.diff, args.against, args.against_file) {
            (false, _, _) => None,
            (true, _, Some(file)) => Some(Against::File(file)),
            (true, Some(url), None) => Some(Against::Admin(url)),
            (true, None, None) => Some(Against::OwnAdmin),
        };
        return ExitCode::from(balancer::check::run(&cli.config, against));
    }
    let config = match balancer::Config::check_file(&cli.config) {
        Ok(c) => c.config,
        Err(errors) => {
            for e in &errors.errors {
                eprintln!("error: {e}");
            }
            return ExitCode::from(1);
        }
    };

    // RUST_LOG wins over [log] level; logs go to stderr, the access log owns stdout.
    balancer::logging::init(&config.log.level);

    // Connections beyond the soft limit would fail with EMFILE long before max_connections.
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() {
        if soft < hard {
            let _ = rlimit::Resource::NOFILE.set(hard, hard);
        }
    }

    // One worker per core we may run on (taskset/cgroups respected). On a single core the
    // current-thread scheduler does the same work without the work-stealing machinery, like
    // one nginx worker.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut builder = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cores);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let opts = balancer::Options {
        config_path: cli.config,
        config,
        prebound: Vec::new(),
        sighup: true,
    };
    let result = runtime.block_on(async {
        // Installed before anything is bound, so a SIGTERM that arrives during start-up is a
        // graceful stop rather than the default kill.
        let shutdown = shutdown_signal();
        usr_signals();
        balancer::run(opts, shutdown, |_| {}).await
    });
    // Connections still draining after shutdown_grace are cut here.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Keeps the heap in 4 KiB pages. mimalloc asks for transparent huge pages on its arena, so
/// buffers that are allocated but barely touched (hyper reserves 8 KiB to read and 8 KiB to
/// write on every connection, both ways) become resident in whole 2 MiB pages: 1000 keep-alive
/// connections under load peak at 101 MB resident with them, 77 MB without (HAProxy: 38 MB).
/// The price, at 1000 connections only, is TLB misses: 8-12% more CPU per request there (four
/// paired runs); none measurable at 64. Memory is what a connection count costs an operator,
/// so it is kept. Set before anything touches the heap's memory; it holds for every mapping
/// made later.
fn small_pages() {
    // SAFETY: prctl(PR_SET_THP_DISABLE) reads no memory of ours; failure (an old kernel) only
    // leaves huge pages allowed.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Installs the SIGTERM/SIGINT handlers now; the future resolves on the first signal, and a
/// second one exits at once.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested; a second signal exits at once");
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting without waiting");
            std::process::exit(1);
        });
    }
}

/// SIGUSR1 and SIGUSR2 kill a process by default; an operator (or logrotate) sending one must
/// never take the balancer down. Installed before anything is bound, handled for the life of
/// the process.
fn usr_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut usr1), Ok(mut usr2)) = (
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
    ) else {
        tracing::warn!(
            "cannot install SIGUSR1/SIGUSR2 handlers; those signals would kill the process"
        );
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = usr1.recv() => {
                    balancer::logging::reopen_files();
                }
                Some(()) = usr2.recv() => {
                    tracing::warn!("SIGUSR2: binary upgrade is not implemented yet; signal ignored");
                }
                else => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    extern "C" {
        // In the mimalloc the allocator links; `libmimalloc-sys` declares it only with its
        // `extended` feature.
        fn mi_usable_size(p: *const std::ffi::c_void) -> usize;
    }

    #[test]
    fn buffers_of_8_kib_come_from_medium_pages() {
        let small = Vec::<u8>::with_capacity(4096);
        let buffer = Vec::<u8>::with_capacity(8192);
        // SAFETY: both pointers are live blocks from mimalloc, the global allocator.
        let (small, buffer) = unsafe {
            (
                mi_usable_size(small.as_ptr().cast()),
                mi_usable_size(buffer.as_ptr().cast()),
            )
        };
        assert_eq!(small, 4096, "a 4 KiB block stays in its small page");
        assert_eq!(
            buffer,
            10 * 1024,
            "an 8 KiB buffer gets a medium page's 10 KiB block"
        );
    }
}
