//! The real `hami-scheduler serve` over HTTPS, as the API server (webhook) and kube-scheduler
//! (extender) call it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failure is the assertion"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::{Value, json};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring};

use super::Stopped;

/// The running `hami-scheduler serve` and a client configuration trusting its certificate.
pub(crate) struct Scheduler {
    /// Its address.
    pub(crate) addr: std::net::SocketAddr,
    tls: Arc<ClientConfig>,
    log: PathBuf,
    /// The process (stopped when dropped).
    pub(crate) process: Stopped,
}

impl Scheduler {
    /// Starts the binary with the webhook on, HTTPS with a fresh self-signed certificate for
    /// `localhost`, the decision key in `key_file`, the API through `kubeconfig`, on a free port.
    pub(crate) fn start(dir: &Path, key_file: &Path, kubeconfig: &Path) -> Self {
        Self::start_on(dir, key_file, kubeconfig, super::free_port(), &json!({}))
    }

    /// [`Self::start`] on `port`, with `extra` merged into the configuration (e.g. quotas).
    pub(crate) fn start_on(dir: &Path, key_file: &Path, kubeconfig: &Path, port: u16, extra: &Value) -> Self {
        let generated =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let (cert, key) = (generated.cert.pem(), generated.signing_key.serialize_pem());
        let (cert_file, key_pem) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert_file, &cert).unwrap();
        std::fs::write(&key_pem, &key).unwrap();
        let config = dir.join("scheduler.json");
        let mut cfg = json!({
            "listen": format!("127.0.0.1:{port}"),
            "decisionKeyFile": key_file,
            "webhook": {"enabled": true},
        });
        if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        std::fs::write(&config, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let log = dir.join("scheduler.log");
        let process = Stopped(
            Command::new(super::scheduler_binary())
                .arg("serve")
                .arg("--config")
                .arg(&config)
                .arg("--tls-cert-file")
                .arg(&cert_file)
                .arg("--tls-key-file")
                .arg(&key_pem)
                .env("KUBECONFIG", kubeconfig)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("starting hami-scheduler"),
        );
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(cert.as_bytes()).unwrap())
            .unwrap();
        let tls = Arc::new(
            ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        Self {
            addr: ([127, 0, 0, 1], port).into(),
            tls,
            log,
            process,
        }
    }

    /// One HTTPS request (`POST` with a JSON body, or `GET`); status and body, `None` while the server
    /// is not up.
    pub(crate) async fn request(&self, path: &str, body: Option<&Value>) -> Option<(u16, Vec<u8>)> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.ok()?;
        let stream = TlsConnector::from(Arc::clone(&self.tls))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .ok()?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = match body {
            Some(b) => http::Request::post(path)
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(serde_json::to_vec(b).unwrap()))),
            None => http::Request::get(path)
                .header("host", "localhost")
                .body(Full::new(Bytes::new())),
        }
        .unwrap();
        let resp = send.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, bytes.to_vec()))
    }

    /// POSTs JSON, expects 200, decodes the JSON reply.
    pub(crate) async fn post(&self, path: &str, body: &Value) -> Value {
        let (status, bytes) = self
            .request(path, Some(body))
            .await
            .unwrap_or_else(|| panic!("{path}: no answer; log:\n{}", self.log_text()));
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&bytes));
        serde_json::from_slice(&bytes).expect("JSON reply")
    }

    /// Waits until `/readyz` answers 200 (reflectors synced).
    pub(crate) async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.request("/readyz", None).await.is_none_or(|(s, _)| s != 200) {
            assert!(
                Instant::now() < deadline,
                "hami-scheduler not ready; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Admits `pod` as the API server does on CREATE: posts the AdmissionReview, checks it is allowed,
    /// and returns the pod with the response's JSON patch applied.
    pub(crate) async fn admit(&self, pod: &Value) -> Value {
        let review = create_review(pod);
        let reply = self.post("/webhook", &review).await;
        let response = &reply["response"];
        assert_eq!(reply["apiVersion"], "admission.k8s.io/v1", "{reply}");
        assert_eq!(response["uid"], review["request"]["uid"], "{reply}");
        assert_eq!(response["allowed"], true, "{reply}");
        admitted_with(pod, response)
    }

    /// The review the API server sends on CREATE of `pod`, posted; the response, or `None` when the
    /// server does not answer 200.
    pub(crate) async fn review(&self, pod: &Value) -> Option<Value> {
        let (status, bytes) = self.request("/webhook", Some(&create_review(pod))).await?;
        if status != 200 {
            return None;
        }
        let reply: Value = serde_json::from_slice(&bytes).ok()?;
        Some(reply["response"].clone())
    }
}

/// The AdmissionReview the API server sends on CREATE of `pod`.
fn create_review(pod: &Value) -> Value {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": "3a1c5e7f-0b2d-4f6a-8c9e-1d3f5a7b9c0e",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"],
            "namespace": pod["metadata"]["namespace"],
            "operation": "CREATE",
            "userInfo": {"username": "alice@example.com", "groups": ["system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        }
    })
}

/// `pod` with an allowed AdmissionResponse's JSON patch applied.
pub(crate) fn admitted_with(pod: &Value, response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let patch: json_patch::Patch = serde_json::from_slice(&patch_bytes(&response["patch"])).unwrap();
    let mut admitted = pod.clone();
    json_patch::patch(&mut admitted, &patch).expect("the webhook's patch applies to what was sent");
    admitted
}

/// The bytes of an AdmissionResponse `patch`: a base64 string (Go's encoding of `[]byte`) or an array of
/// byte values (kube-core's); the API server accepts both.
fn patch_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|b| u8::try_from(b.as_u64().expect("byte")).expect("byte"))
            .collect(),
        Value::String(s) => {
            let val = |c: u8| match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => panic!("not base64: {s}"),
            };
            let digits: Vec<u8> = s.bytes().filter(|c| *c != b'=').map(val).collect();
            digits
                .chunks(4)
                .flat_map(|c| {
                    let n = c
                        .iter()
                        .enumerate()
                        .fold(0u32, |n, (i, d)| n | u32::from(*d) << (18 - 6 * i));
                    let bytes = n.to_be_bytes();
                    bytes[1..c.len()].to_vec()
                })
                .collect()
        }
        other => panic!("patch is {other}"),
    }
}
