//! `hami-fake-node`: start a simulated GPU node by hand, read its ground truth, or act as a tenant.
//!
//! - `hami-fake-node serve --mount DIR [--gpus N] [--memory-mib M]`: mounts the fake device files at
//!   DIR and serves them until SIGINT/SIGTERM, then unmounts and exits (nothing left behind). Prints
//!   `ready DIR` on stdout once mounted.
//! - `hami-fake-node truth DIR`: prints the node's ground truth (JSON).
//! - `hami-fake-node alloc DIR --gpu G --bytes B [--count C] [--via nvos21|nvos64|vid-heap] [--free]`:
//!   a tenant process: opens `DIR/nvidiactl`, allocates with raw RM ioctls, prints `allocated <handles>`,
//!   then waits for a line (or EOF) on stdin and exits, freeing with RM_FREE first only if `--free`
//!   (otherwise the close frees it, as on a real driver).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hami_fake_gpu::client::{AllocVia, RmClient};
use hami_fake_gpu::{DeviceModel, FakeNode, fs};
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser)]
#[command(about = "The simulated GPU node: fake NVIDIA device files over FUSE")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount and serve until SIGINT/SIGTERM.
    Serve {
        /// Mount directory (created if missing).
        #[arg(long)]
        mount: PathBuf,
        /// Number of GPUs.
        #[arg(long, default_value_t = 2)]
        gpus: u32,
        /// Memory per GPU, MiB.
        #[arg(long, default_value_t = 81_559)]
        memory_mib: u64,
    },
    /// Print the ground truth of a mounted node.
    Truth {
        /// Mount directory.
        dir: PathBuf,
    },
    /// Act as a tenant: allocate device memory with raw ioctls, wait for stdin, exit.
    Alloc {
        /// Mount directory.
        dir: PathBuf,
        /// GPU index.
        #[arg(long, default_value_t = 0)]
        gpu: u32,
        /// Bytes per allocation.
        #[arg(long)]
        bytes: u64,
        /// Number of allocations.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Allocation path: nvos21, nvos64 or vid-heap.
        #[arg(long, default_value = "nvos21")]
        via: AllocVia,
        /// Free with RM_FREE before exiting (default: exit without freeing).
        #[arg(long)]
        free: bool,
    },
}

fn serve(mount: PathBuf, gpus: u32, memory_mib: u64) -> Result<()> {
    // Block the signals before the server thread starts, so only sigwait below receives them.
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGINT/SIGTERM")?;
    let node = FakeNode::start(&mount, DeviceModel::uniform(gpus, memory_mib))
        .with_context(|| format!("mounting {}", mount.display()))?;
    println!("ready {}", node.dir().display());
    let sig = set.wait().context("waiting for a signal")?;
    eprintln!("hami-fake-node: {sig:?}, unmounting {}", node.dir().display());
    node.stop().context("unmounting")
}

fn alloc(dir: PathBuf, gpu: u32, bytes: u64, count: u32, via: AllocVia, free: bool) -> Result<()> {
    let c = RmClient::open(&dir).with_context(|| format!("opening {}", dir.join("nvidiactl").display()))?;
    let dev = c.alloc_device(gpu).context("allocating NV01_DEVICE_0")?;
    let mut handles = Vec::new();
    for _ in 0..count {
        handles.push(
            c.alloc_vidmem(dev, bytes, via)
                .context("allocating device memory")?,
        );
    }
    let list: Vec<String> = handles.iter().map(|h| format!("{h:#x}")).collect();
    println!("allocated {}", list.join(" "));
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    if free {
        for h in handles {
            c.free(dev, h).context("freeing")?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve {
            mount,
            gpus,
            memory_mib,
        } => serve(mount, gpus, memory_mib),
        Cmd::Truth { dir } => {
            let t = fs::read_ground_truth(&dir).with_context(|| format!("reading {}", dir.display()))?;
            println!("{}", serde_json::to_string_pretty(&t)?);
            Ok(())
        }
        Cmd::Alloc {
            dir,
            gpu,
            bytes,
            count,
            via,
            free,
        } => {
            if bytes == 0 {
                bail!("--bytes must be positive");
            }
            alloc(dir, gpu, bytes, count, via, free)
        }
    }
}
