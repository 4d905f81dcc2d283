//! Harness for the agent's kernel tests: a simulated GPU node (FUSE control device, fake libcuda),
//! a private bpffs, cgroups laid out like the kubelet's, tenant processes placed in them, and
//! cleanup that leaves no mount, cgroup or BPF program behind.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use hami_agent::config::{AgentConfig, HostPaths};
use hami_agent::service::Agent;
use hami_agent::snapshot::{Container, Snapshot};
use hami_fake_gpu::FakeNode;
use hami_fake_gpu::model::DeviceModel;
use hami_fake_gpu::node::privileged_or_skip;

/// `target/<profile>` of this test binary.
pub(crate) fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Runs `cargo build <args>` in this test binary's profile (`--release` under `target/release`) and
/// asserts that it succeeded.
fn cargo_build(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").args(args);
    if target_dir().ends_with("release") {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().is_ok_and(|s| s.success()),
        "cargo build {} failed",
        args.join(" ")
    );
}

/// The `hami-scheduler` binary, built (or brought up to date) first: it is another package's binary,
/// which `cargo test -p hami-agent` does not build.
pub(crate) fn scheduler_binary() -> PathBuf {
    cargo_build(&["-p", "hami-scheduler", "--bin", "hami-scheduler"]);
    let bin = target_dir().join("hami-scheduler");
    assert!(bin.exists(), "{} after building", bin.display());
    bin
}

/// The tenant program and the fake libcuda, brought up to date once per test binary (`cargo test -p
/// hami-agent` builds only this package's targets, and a stale workload would lack new options).
fn artifacts() -> (PathBuf, PathBuf) {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| cargo_build(&["-p", "hami-fake-cuda"]));
    let t = target_dir();
    let w = t.join("hami-cuda-workload");
    let lib = [t.join("deps/libcuda.so"), t.join("libcuda.so")]
        .into_iter()
        .find(|p| p.exists());
    match lib {
        Some(l) if w.exists() => (w, l),
        _ => panic!("hami-cuda-workload and libcuda.so after building hami-fake-cuda"),
    }
}

/// The fake `libnvidia-ml.so` built with the workspace (built by `cargo test --workspace`; built here
/// when missing).
pub(crate) fn fake_nvml() -> PathBuf {
    let t = target_dir();
    let find = |t: &Path| {
        [t.join("deps/libnvidia_ml.so"), t.join("libnvidia_ml.so")]
            .into_iter()
            .find(|p| p.exists())
    };
    if let Some(p) = find(&t) {
        return p;
    }
    cargo_build(&["-p", "hami-fake-nvml"]);
    find(&t).expect("libnvidia_ml.so after building hami-fake-nvml")
}

/// The interceptor library, built fresh (a cdylib is only a by-product of `cargo test`).
pub(crate) fn libvgpu() -> PathBuf {
    let t = target_dir();
    cargo_build(&["-p", "hami-interceptor"]);
    [t.join("libvgpu.so"), t.join("deps/libvgpu.so")]
        .into_iter()
        .find(|p| p.exists())
        .expect("libvgpu.so")
}

/// The cgroup2 mount of this machine.
fn cgroup2_root() -> PathBuf {
    hami_agent::cgroup::cgroup2_mount(Path::new("/proc/self/mounts"))
        .expect("reading /proc/self/mounts")
        .expect("a cgroup2 mount (the agent attributes by cgroup v2 id)")
}

/// One test's simulated node and agent environment.
pub(crate) struct Env {
    /// The node (device files under `node.dir()`).
    pub(crate) node: FakeNode,
    /// Scratch directory (lib copy, state, bpffs mount point).
    pub(crate) dir: PathBuf,
    /// The agent configuration for this environment.
    pub(crate) cfg: AgentConfig,
    workload: PathBuf,
    lib_dir: PathBuf,
    cg_root: PathBuf,
    bpffs_mount: PathBuf,
    /// Declared last: fields drop in order, so the scratch directory goes after the node is unmounted.
    _scratch: Scratch,
}

/// Removes a directory when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Container identities used in tests: (pod UID, container ID).
pub(crate) fn ids(n: u8) -> (String, String) {
    (
        format!("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1{n:02x}"),
        format!("{:064x}", 0xc0de_0000_u64 + u64::from(n)),
    )
}

impl Env {
    /// A node of `gpus` GPUs of `memory_mib` each; `None` (test skipped) without privileges.
    pub(crate) fn new(test: &str, gpus: u32, memory_mib: u64) -> Option<Self> {
        if !privileged_or_skip(test) {
            return None;
        }
        let (workload, lib) = artifacts();
        let dir = std::env::temp_dir().join(format!("hami-agent-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let lib_dir = dir.join("lib");
        std::fs::create_dir_all(&lib_dir).expect("lib dir");
        std::fs::copy(&lib, lib_dir.join("libcuda.so.1")).expect("copying the fake libcuda");
        // The steps that can fail come before the bpffs mount, which only `Env`'s drop undoes: a
        // panic here must not leave a mount behind.
        let node = FakeNode::start(&dir.join("node"), DeviceModel::uniform(gpus, memory_mib))
            .expect("starting the simulated node");
        let cg_root = cgroup2_root().join(format!("hami-test-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&cg_root).expect("test cgroup");
        let bpffs_mount = dir.join("bpf");
        std::fs::create_dir_all(&bpffs_mount).expect("bpffs mount point");
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpffs_mount)
            .status()
            .expect("mount -t bpf");
        if !st.success() {
            let _ = std::fs::remove_dir(&cg_root);
            panic!("mounting a bpffs at {}", bpffs_mount.display());
        }
        let cfg = AgentConfig {
            node_name: "test-node".into(),
            listen: "127.0.0.1:0".into(),
            interval_ms: 100,
            retain_terminated_secs: 0,
            // Explicit, so both hooks are always covered (one test sets Tracepoint).
            syscall_hook: hami_agent::config::SyscallHook::Raw,
            hard_limit: false,
            driver_version: Some("595.45.04".into()),
            libcuda: vec![lib_dir.join("libcuda.so.1")],
            nvml_lib: None,
            paths: HostPaths {
                dev_dir: node.dir().to_path_buf(),
                bpffs: bpffs_mount.join("hami"),
                state_dir: dir.join("state"),
                regions_dir: dir.join("regions"),
                ..HostPaths::default()
            },
            // Device plugin and registration off unless a test turns them on.
            ..AgentConfig::default()
        };
        Some(Self {
            node,
            _scratch: Scratch(dir.clone()),
            dir,
            cfg,
            workload,
            lib_dir,
            cg_root,
            bpffs_mount,
        })
    }

    /// A container cgroup `n` laid out as the kubelet's cgroupfs driver does
    /// (`kubepods/burstable/pod<uid>/<container id>`). Returns its path.
    pub(crate) fn container(&self, n: u8) -> PathBuf {
        self.container_in(n, n)
    }

    /// Container `ctr` of pod `pod` (several containers of one pod share the pod cgroup).
    pub(crate) fn container_in(&self, pod: u8, ctr: u8) -> PathBuf {
        let (uid, _) = ids(pod);
        let (_, cid) = ids(ctr);
        self.pod_container(&uid, &cid)
    }

    /// The cgroup of container `cid` of the pod with UID `uid`, as the kubelet's cgroupfs driver lays it
    /// out. Returns its path.
    pub(crate) fn pod_container(&self, uid: &str, cid: &str) -> PathBuf {
        let p = self
            .cg_root
            .join("kubepods/burstable")
            .join(format!("pod{uid}"))
            .join(cid);
        std::fs::create_dir_all(&p).expect("container cgroup");
        p
    }

    /// Starts the tenant program inside cgroup `cg` with `args` (and extra `env`).
    pub(crate) fn spawn(&self, cg: &Path, args: &[&str], env: &[(&str, &str)]) -> Tenant {
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec '{}' \"$@\"",
            cg.display(),
            self.workload.display()
        );
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(script).arg("hami-cuda-workload");
        self.start_tenant(sh, args, env)
    }

    /// Runs `sh` (a `sh -c` command line that ends by exec'ing the tenant program) with the tenant's
    /// `args`, `env` and the simulated node's environment, piped; the tenant once it told its pid.
    fn start_tenant(&self, mut sh: Command, args: &[&str], env: &[(&str, &str)]) -> Tenant {
        let mut child = sh
            .args(args)
            .envs(env.iter().copied())
            .env("HAMI_FAKE_GPU_DIR", self.node.dir())
            .env("LD_LIBRARY_PATH", &self.lib_dir)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the tenant");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut t = Tenant { child, out, pid: 0 };
        t.pid = t.words("pid ")[0].parse().expect("pid line");
        t
    }

    /// Starts an agent on this environment (library API, no HTTP).
    pub(crate) fn agent(&self) -> Agent {
        Agent::start(self.cfg.clone()).expect("starting the agent")
    }

    /// Writes the configuration as a JSON file and returns its path.
    pub(crate) fn config_file(&self, listen: &str) -> PathBuf {
        let mut cfg = self.cfg.clone();
        cfg.listen = listen.into();
        let p = self.dir.join("agent.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&cfg).expect("config JSON")).expect("writing config");
        p
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = hami_agent::loader::detach(&self.cfg.paths.bpffs);
        let _ = Command::new("umount").arg(&self.bpffs_mount).status();
        // Stop whatever still runs in the test's cgroups (a tenant a test did not finish), then remove
        // the tree bottom-up.
        let _ = std::fs::write(self.cg_root.join("cgroup.kill"), "1");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(self.cg_root.join("cgroup.events"))
            .is_ok_and(|e| e.lines().any(|l| l == "populated 1"))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut dirs = Vec::new();
        let mut stack = vec![self.cg_root.clone()];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        // The node (a FUSE mount inside the scratch directory) is unmounted when its field drops, and
        // the directory is removed after it (`_scratch`).
    }
}

impl Drop for Tenant {
    fn drop(&mut self) {
        // A tenant left running would keep its cgroup (and the node's files) busy.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running tenant program.
pub(crate) struct Tenant {
    child: Child,
    out: BufReader<ChildStdout>,
    /// Its pid.
    pub(crate) pid: u32,
}

impl Tenant {
    /// The words after `prefix` on the next line starting with it.
    pub(crate) fn words(&mut self, prefix: &str) -> Vec<String> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).expect("tenant stdout");
            if n == 0 {
                let _ = self.child.wait();
                let mut e = String::new();
                if let Some(mut s) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut s, &mut e);
                }
                panic!("tenant exited before a `{prefix}` line; stderr: {e}");
            }
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.split_whitespace().map(str::to_owned).collect();
            }
        }
    }

    /// Ends a `--hold` wait.
    pub(crate) fn send(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"\n").expect("tenant stdin");
        stdin.flush().expect("tenant stdin");
    }

    /// The exit status when the tenant has ended, without waiting.
    pub(crate) fn try_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the exit (stdin stays open) and returns its status.
    pub(crate) fn status(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("waiting for the tenant")
    }

    /// Closes stdin, waits for the exit, and returns (success, stderr).
    pub(crate) fn outcome(mut self) -> (bool, String) {
        drop(self.child.stdin.take());
        let ok = self.child.wait().is_ok_and(|s| s.success());
        let mut e = String::new();
        if let Some(mut s) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut s, &mut e);
        }
        (ok, e)
    }

    /// Closes stdin and waits for the exit.
    pub(crate) fn finish(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Pumps the agent until no event arrived for 200 ms, then returns its snapshot.
pub(crate) fn settle(agent: &mut Agent) -> Snapshot {
    let mut quiet = Instant::now();
    let start = Instant::now();
    while quiet.elapsed() < Duration::from_millis(200) && start.elapsed() < Duration::from_secs(10) {
        if agent.pump(50) > 0 {
            quiet = Instant::now();
        }
    }
    agent.snapshot(false)
}

/// Polls until `cond` holds (10 s at most; FUSE releases arrive asynchronously after an exit).
pub(crate) fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cgroup v2 id (directory inode) of `cg`.
pub(crate) fn cgroup_id(cg: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(cg).expect("cgroup dir").ino()
}

/// The snapshot's container for cgroup `cg`.
pub(crate) fn container<'a>(s: &'a Snapshot, cg: &Path) -> &'a Container {
    let id = cgroup_id(cg);
    s.containers
        .iter()
        .find(|c| c.cgroup_id == id)
        .unwrap_or_else(|| panic!("no container for {} in {s:#?}", cg.display()))
}

/// Attributed device bytes of container `cg` on `gpu` (0 when absent).
pub(crate) fn attributed(s: &Snapshot, cg: &Path, gpu: u32) -> u64 {
    let id = cgroup_id(cg);
    s.containers
        .iter()
        .filter(|c| c.cgroup_id == id)
        .flat_map(|c| c.gpus.iter())
        .filter(|g| g.gpu == Some(gpu))
        .map(|g| g.memory_bytes)
        .sum()
}

// ---------------------------------------------------------------------------------------------------
// The agent binary and a real Prometheus, over HTTP.

/// A free TCP port on the loopback interface.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// GET over HTTP/1.0 on the loopback; the body, or `None` while the server is not up or answers other
/// than 200.
pub(crate) fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, rest) = body.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?;
    (status == "200").then(|| rest.to_owned())
}

/// Percent-encodes a query parameter value.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A child process stopped with SIGTERM (the agent then saves its state), then SIGKILL, when dropped.
pub(crate) struct Stopped(pub(crate) Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.0.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the agent binary on `env` (HTTP on a free loopback port) and waits for `/healthz`. Returns
/// the process and its port.
pub(crate) fn start_agent(env: &Env, agent_binary: &Path) -> (Stopped, u16) {
    launch_agent(
        env,
        agent_binary,
        &[] as &[(&str, &Path)],
        Duration::from_secs(20),
    )
}

/// Starts the agent binary on `env` with extra environment `vars` and waits (`up_within` at most)
/// until it answers `/healthz`.
fn launch_agent<V: AsRef<std::ffi::OsStr>>(
    env: &Env,
    agent_binary: &Path,
    vars: &[(&str, V)],
    up_within: Duration,
) -> (Stopped, u16) {
    let port = free_port();
    (launch_agent_on(env, agent_binary, vars, up_within, port), port)
}

/// [`launch_agent`] on `port` (a restarted agent keeps its address).
pub(crate) fn launch_agent_on<V: AsRef<std::ffi::OsStr>>(
    env: &Env,
    agent_binary: &Path,
    vars: &[(&str, V)],
    up_within: Duration,
    port: u16,
) -> Stopped {
    let cfg = env.config_file(&format!("127.0.0.1:{port}"));
    let log = std::fs::File::create(env.dir.join("agent.log")).expect("agent log");
    let mut cmd = Command::new(agent_binary);
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .env("HAMI_FAKE_GPU_DIR", env.node.dir())
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let agent = Stopped(cmd.spawn().expect("starting hami-agent"));
    let deadline = Instant::now() + up_within;
    while http_get(port, "/healthz").is_none() {
        assert!(
            Instant::now() < deadline,
            "the agent did not come up: {}",
            std::fs::read_to_string(env.dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

/// Whether the `prometheus` binary is installed; when it is not, fails under
/// `HAMI_REQUIRE_PRIVILEGED=1` and otherwise says the test is skipped.
pub(crate) fn prometheus_or_skip(test: &str) -> bool {
    let installed = Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        assert!(
            std::env::var_os("HAMI_REQUIRE_PRIVILEGED").is_none_or(|v| v != "1"),
            "prometheus is not installed (apt-get install prometheus; cargo xtask ci does it)"
        );
        eprintln!("skipped {test}: prometheus is not installed");
    }
    installed
}

/// Starts a real Prometheus scraping the agent on `agent_port` every second (data in `tsdb`, default
/// under the scratch directory) and waits for its first sample. Returns the process and its port.
pub(crate) fn start_prometheus(env: &Env, agent_port: u16, tsdb: Option<&Path>) -> (Stopped, u16) {
    start_prometheus_jobs(env, &[("hami-agent", agent_port)], tsdb)
}

/// A real Prometheus scraping `targets` (job name, port) every second (data in `tsdb`, default under
/// the scratch directory); waits until every job is up. Returns the process and its port.
pub(crate) fn start_prometheus_jobs(
    env: &Env,
    targets: &[(&str, u16)],
    tsdb: Option<&Path>,
) -> (Stopped, u16) {
    let dir = env.dir.join("prometheus");
    std::fs::create_dir_all(&dir).expect("prometheus dir");
    let data = tsdb.map_or_else(|| dir.join("data"), Path::to_path_buf);
    let _ = std::fs::remove_dir_all(&data);
    let mut cfg =
        String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n");
    for (job, port) in targets {
        cfg += &format!("  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n");
    }
    let file = dir.join("prometheus.yml");
    std::fs::write(&file, cfg).expect("prometheus.yml");
    let port = free_port();
    let prom = Stopped(
        Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus"),
    );
    let up = format!("/api/v1/query?query={}", encode("count(up == 1)"));
    let want = format!("\"{}\"]", targets.len());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(port, &up).is_some_and(|b| b.contains(&want)) {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped every target: {targets:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (prom, port)
}

// ---------------------------------------------------------------------------------------------------
// Kubernetes stand-ins: the test kubelet (device plugin registration and client).

pub(crate) mod kubelet;

/// The files of a node wired for Kubernetes: the API server's kubeconfig, the decision key (with a
/// trailing newline, as a mounted Secret may have), the host directory `install-interceptor` filled
/// (`libvgpu.so`, `ld.so.preload`) and the kubelet's device plugin directory.
pub(crate) struct KubeNode {
    pub(crate) kubeconfig: PathBuf,
    pub(crate) key_file: PathBuf,
    pub(crate) host_vgpu: PathBuf,
    pub(crate) plugin_dir: PathBuf,
}

/// Wires `env` as node `node` of the fake API server `api` (which gets the Node object): kubeconfig,
/// decision key `key`, the interceptor installed on the host by `hami-agent install-interceptor` (the
/// chart's init container), and the agent configured with fake NVML, node registration (1 s heartbeat)
/// and the device plugin (`split` replicas per GPU, the simulated node's directory as the host's
/// `/dev`).
pub(crate) fn kube_node(
    env: &mut Env,
    api: &hami_fake_apiserver::FakeApiServer,
    node: &str,
    key: &[u8],
    split: u32,
) -> KubeNode {
    api.insert_node(k8s_openapi::api::core::v1::Node {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(node.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    });
    let kubeconfig = env.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let key_file = env.dir.join("decision-key");
    std::fs::write(&key_file, [key, b"\n"].concat()).expect("decision key");
    let host_vgpu = env.dir.join("host-vgpu");
    let st = Command::new(env!("CARGO_BIN_EXE_hami-agent"))
        .arg("install-interceptor")
        .arg("--library")
        .arg(libvgpu())
        .arg("--dir")
        .arg(&host_vgpu)
        .stdout(Stdio::null())
        .status()
        .expect("hami-agent install-interceptor");
    assert!(st.success(), "hami-agent install-interceptor");
    let plugin_dir = env.dir.join("device-plugins");
    std::fs::create_dir_all(&plugin_dir).expect("plugin dir");
    env.cfg.node_name = node.to_owned();
    env.cfg.nvml_lib = Some(fake_nvml());
    env.cfg.registration = hami_agent::registration::RegistrationConfig {
        enabled: true,
        heartbeat_secs: 1,
        retry_secs: 1,
        device_split_count: split,
        kubeconfig: Some(kubeconfig.clone()),
        ..Default::default()
    };
    env.cfg.device_plugin = hami_agent::deviceplugin::DevicePluginConfig {
        enabled: true,
        plugin_dir: plugin_dir.clone(),
        split_count: split,
        libvgpu_host_path: host_vgpu.join("libvgpu.so"),
        ld_so_preload_host_path: Some(host_vgpu.join("ld.so.preload")),
        decision_key_file: key_file.clone(),
        watch_interval_ms: 100,
        health_interval_ms: 200,
        host_dev_dir: env.node.dir().to_path_buf(),
        ..Default::default()
    };
    KubeNode {
        kubeconfig,
        key_file,
        host_vgpu,
        plugin_dir,
    }
}

// The real scheduler binary over HTTPS.

pub(crate) mod scheduler;

// ---------------------------------------------------------------------------------------------------
// Kubernetes-shaped runs: the agent binary with environment (KUBECONFIG), tenants started the way a
// container runtime starts a container from an Allocate response.

/// Like [`start_agent`], with extra environment for the agent process (e.g. `KUBECONFIG`, which the
/// device plugin's API client reads); waits 30 s at most.
pub(crate) fn start_agent_with_env<V: AsRef<std::ffi::OsStr>>(
    env: &Env,
    agent_binary: &Path,
    vars: &[(&str, V)],
) -> (Stopped, u16) {
    launch_agent(env, agent_binary, vars, Duration::from_secs(30))
}

/// Single-quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Env {
    /// Starts the tenant program as a container runtime would start it from an Allocate response: in
    /// cgroup `cg`, in a private mount namespace (the host's mounts are not touched) where `/usr/local`
    /// is a fresh tmpfs and every mount of the response is bind-mounted from its host path at its
    /// container path (a read-only one remounted read-only; a file's mount point is created, as the
    /// runtime creates it), with `env` (the response's envs and the like). Container paths must lie
    /// under `/usr/local`; callers emulate others (`/etc/ld.so.preload`) themselves.
    pub(crate) fn spawn_container(
        &self,
        cg: &Path,
        mounts: &[(String, String, bool)],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Tenant {
        let mut script = String::from("set -e; mount -t tmpfs hami-test /usr/local");
        for (ctr, host, read_only) in mounts {
            assert!(
                ctr.starts_with("/usr/local/"),
                "mount at {ctr}: only /usr/local is emulated"
            );
            let (c, h) = (sh_quote(ctr), sh_quote(host));
            if Path::new(host).is_dir() {
                script += &format!("; mkdir -p {c}");
            } else {
                script += &format!("; mkdir -p \"$(dirname {c})\"; [ -e {c} ] || touch {c}");
            }
            script += &format!("; mount --bind {h} {c}");
            if *read_only {
                script += &format!("; mount -o remount,bind,ro {c}");
            }
        }
        script += "; exec \"$0\" \"$@\"";
        let outer = format!(
            "echo $$ > {} && exec unshare -m --propagation private sh -c \"$0\" \"$@\"",
            sh_quote(&cg.join("cgroup.procs").to_string_lossy())
        );
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(outer).arg(script).arg(&self.workload);
        self.start_tenant(sh, args, env)
    }
}
