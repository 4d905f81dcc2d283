//! Stopping the extender while binds are in flight, and the next extender's state: in-flight binds
//! finish or roll back, new binds are refused while draining, and the new extender's books equal the
//! API's truth (no leaked assumption, no lost allocation). Also: a decision left on a pending pod by a
//! killed extender is replaced at the pod's next bind. And bind reads the reflector's copy of the pod
//! (no GET) and falls back to a GET when that copy was stale.

mod common;

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use common::{KEY, bind_args, busy, clock, eventually, extender, gpu_pod, gpus, ground_truth, node, post};
use hami_api::annotations::{BIND_PHASE, DEVICES_ALLOCATED, DEVICES_TO_ALLOCATE, VGPU_NODE};
use hami_fake_apiserver::FakeApiServer;
use hami_scheduler::state::Settings;
use http::Request;
use tokio::sync::watch;

/// Holds matching requests of a kube client until released (`hold`), recording when they arrive.
#[derive(Clone, Default)]
struct Gate {
    rules: Arc<Mutex<Vec<Rule>>>,
}

struct Rule {
    method: &'static str,
    path: String,
    /// How many more matching requests to hold.
    times: u32,
    arrived: watch::Sender<u32>,
    release: watch::Receiver<bool>,
}

/// One hold: wait for arrivals, release.
struct Hold {
    arrived: watch::Receiver<u32>,
    release: watch::Sender<bool>,
}

impl Hold {
    async fn arrived(&mut self, n: u32) {
        tokio::time::timeout(Duration::from_secs(10), self.arrived.wait_for(|a| *a >= n))
            .await
            .expect("request arrived in time")
            .expect("gate alive");
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

impl Gate {
    fn hold(&self, method: &'static str, path: &str, times: u32) -> Hold {
        let (arrived_tx, arrived_rx) = watch::channel(0);
        let (release_tx, release_rx) = watch::channel(false);
        self.rules.lock().expect("gate").push(Rule {
            method,
            path: path.to_owned(),
            times,
            arrived: arrived_tx,
            release: release_rx,
        });
        Hold {
            arrived: arrived_rx,
            release: release_tx,
        }
    }

    fn matching(&self, method: &str, path: &str) -> Option<watch::Receiver<bool>> {
        let mut rules = self.rules.lock().expect("gate");
        let rule = rules
            .iter_mut()
            .find(|r| r.times > 0 && r.method == method && path.contains(&r.path))?;
        rule.times -= 1;
        rule.arrived.send_modify(|a| *a += 1);
        Some(rule.release.clone())
    }
}

struct Gated<S> {
    inner: S,
    gate: Gate,
}

impl<S, B> tower::Service<Request<B>> for Gated<S>
where
    S: tower::Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let hold = self.gate.matching(req.method().as_str(), req.uri().path());
        // The inner future sends nothing until polled, so a held request has not reached the server.
        let fut = self.inner.call(req);
        Box::pin(async move {
            if let Some(mut release) = hold {
                let _ = release.wait_for(|r| *r).await;
            }
            fut.await
        })
    }
}

/// A kube client for `fake` whose requests pass through `gate`.
fn gated_client(fake: &FakeApiServer, gate: &Gate) -> kube::Client {
    let config = kube::Config::new(fake.url().parse().expect("url"));
    let gate = gate.clone();
    kube::client::ClientBuilder::try_from(config)
        .expect("client builder")
        .with_layer(&tower::layer::layer_fn(move |inner| Gated {
            inner,
            gate: gate.clone(),
        }))
        .build()
}

fn unbound_decisions(fake: &FakeApiServer) -> Vec<String> {
    fake.pods()
        .into_iter()
        .filter(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none()
                && p.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(DEVICES_ALLOCATED))
        })
        .filter_map(|p| p.metadata.name)
        .collect()
}

/// Pod `a`'s Binding and pod `b`'s decision patch are held when the extender is told to stop with a
/// 2 s grace. A new bind (`d`) is refused at once. `a`'s Binding is released within the grace: `a`
/// finishes, bound with its decision. `b`'s patch never reached the API; at the end of the grace `b`
/// rolls back (no decision left on it). A second extender then holds exactly `a`'s allocation, equal
/// to the ground truth from the API, and binds `b` and `d`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_mid_bind_then_restart_matches_the_api() {
    let fake = FakeApiServer::start().await.expect("fake");
    // b goes to its own node: two one-GPU binds with different decisions on one node would hold each
    // other off (the pending-allocation rule).
    fake.insert_node(node("n", &gpus("n", 2, 16_000)));
    fake.insert_node(node("m", &gpus("m", 2, 16_000)));
    let a = fake.insert_pod(gpu_pod("a", 1, 4000, 20));
    let b = fake.insert_pod(gpu_pod("b", 1, 3000, 20));
    let d = fake.insert_pod(gpu_pod("d", 1, 2000, 20));
    let gate = Gate::default();
    let mut hold_a = gate.hold("POST", "/pods/a/binding", 1);
    let mut hold_b = gate.hold("PATCH", "/pods/b", 1);
    let (clock1, _) = clock();
    let first = extender(gated_client(&fake, &gate), Settings::default(), clock1).await;
    let addr = first.addr;
    let bind_a = tokio::spawn(async move { post(addr, "/bind", &bind_args(&a, "n")).await });
    let b2 = b.clone();
    let bind_b = tokio::spawn(async move { post(addr, "/bind", &bind_args(&b2, "m")).await });
    hold_a.arrived(1).await;
    hold_b.arrived(1).await;
    assert!(
        !fake
            .requests()
            .iter()
            .any(|r| r.method == "PATCH" && r.path_and_query.contains("/pods/b")),
        "b's patch is held before the API"
    );
    assert_eq!(first.app.read_state().binds_in_flight(), 2);
    let app = Arc::clone(&first.app);
    let stopping = tokio::spawn(async move { first.shutdown(Duration::from_secs(2)).await });
    eventually("draining", || app.draining()).await;
    let refused = post(addr, "/bind", &bind_args(&d, "n")).await;
    assert!(
        refused["Error"]
            .as_str()
            .is_some_and(|e| e.contains("shutting down")),
        "{refused}"
    );
    let (status, _) = common::http(addr, "/readyz", None).await;
    assert_eq!(status, 503, "not ready while draining");
    tokio::time::sleep(Duration::from_millis(200)).await;
    hold_a.release();
    let report = stopping.await.expect("shutdown");
    assert_eq!(
        bind_a.await.expect("a")["Error"],
        "",
        "a finished within the grace"
    );
    let rb = bind_b.await.expect("b");
    assert!(
        rb["Error"].as_str().is_some_and(|e| e.contains("rolled back")),
        "{rb}"
    );
    assert_eq!(report.in_flight, 2);
    assert_eq!(report.rolled_back, 1);
    assert_eq!(report.unfinished, 0);
    hold_b.release();
    // The API: a bound with its decision, b pending without one, nothing else written.
    assert!(
        unbound_decisions(&fake).is_empty(),
        "{:?}",
        unbound_decisions(&fake)
    );
    let stored_b = fake.pod("default", "b").expect("b");
    assert_eq!(
        stored_b
            .metadata
            .annotations
            .unwrap_or_default()
            .get(BIND_PHASE)
            .map(String::as_str),
        Some("failed")
    );
    let truth = ground_truth(&fake.pods());
    assert_eq!(truth.len(), 1, "{truth:?}");

    let (clock2, _) = clock();
    let second = extender(fake.client(), Settings::default(), clock2).await;
    assert_eq!(
        busy(second.app.read_state().gpu_usage()),
        truth,
        "rebuilt = API truth"
    );
    assert_eq!(second.app.read_state().allocations(), 1);
    assert!(second.app.read_state().holds("uid-a"));
    // a's Allocate (as the device plugin would) so that b and d are not held off by the pending rule.
    let mut stored_a = fake.pod("default", "a").expect("a");
    let ann = stored_a.metadata.annotations.get_or_insert_with(Default::default);
    ann.insert(DEVICES_TO_ALLOCATE.to_owned(), ";".to_owned());
    ann.insert(BIND_PHASE.to_owned(), "success".to_owned());
    fake.insert_pod(stored_a);
    eventually("a allocated", || {
        second
            .app
            .read_state()
            .pod("uid-a")
            .is_some_and(|r| r.bind_phase.as_deref() == Some("success"))
    })
    .await;
    for (p, n) in [(&b, "m"), (&d, "n")] {
        let v = post(second.addr, "/bind", &bind_args(p, n)).await;
        assert_eq!(v["Error"], "", "{v}");
    }
    eventually("books = truth", || {
        busy(second.app.read_state().gpu_usage()) == ground_truth(&fake.pods())
    })
    .await;
    assert_eq!(second.app.read_state().allocations(), 3);
}

/// A killed extender (no graceful stop) can leave a decision on a pod that never got its Binding. The
/// next extender counts it (it cannot tell it from a bind in flight elsewhere), and when
/// kube-scheduler binds the pod again, the void decision is replaced: the pod binds, one allocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_left_by_a_killed_bind_is_replaced() {
    let fake = FakeApiServer::start().await.expect("fake");
    fake.insert_node(node("n", &gpus("n", 2, 16_000)));
    let orphan = fake.insert_pod(common::annotated(
        gpu_pod("o", 1, 5000, 20),
        &[
            (VGPU_NODE, "n"),
            (DEVICES_ALLOCATED, "GPU-n-1,NVIDIA,5000,20:;"),
            (DEVICES_TO_ALLOCATE, "GPU-n-1,NVIDIA,5000,20:;"),
            (BIND_PHASE, "allocating"),
        ],
    ));
    let (clock, _) = clock();
    let ext = extender(fake.client(), Settings::default(), clock).await;
    assert!(ext.app.read_state().holds("uid-o"), "counted until settled");
    let v = post(ext.addr, "/bind", &bind_args(&orphan, "n")).await;
    assert_eq!(v["Error"], "", "{v}");
    eventually("books = truth", || {
        busy(ext.app.read_state().gpu_usage()) == ground_truth(&fake.pods())
            && ext.app.read_state().pod("uid-o").is_some_and(|r| !r.ours_unseen)
    })
    .await;
    assert_eq!(ext.app.read_state().allocations(), 1);
    let stored = fake.pod("default", "o").expect("o");
    let ann = stored.metadata.annotations.expect("annotations");
    assert!(hami_api::annotations::verify_decision(
        KEY,
        "uid-o",
        "n",
        &ann[DEVICES_ALLOCATED],
        &ann[hami_api::annotations::DECISION_SIGNATURE]
    ));
}

/// Bind reads the pending pod from the reflector (no GET); a 409 on the patch made from that copy is
/// retried once from a GET and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_reads_the_reflector_copy_and_falls_back_to_get() {
    let fake = FakeApiServer::start().await.expect("fake");
    fake.insert_node(node("n", &gpus("n", 2, 16_000)));
    fake.insert_node(node("m", &gpus("m", 2, 16_000)));
    let p = fake.insert_pod(gpu_pod("p", 1, 1000, 10));
    let q = fake.insert_pod(gpu_pod("q", 1, 1000, 10));
    let (clock, _) = clock();
    let ext = extender(fake.client(), Settings::default(), clock).await;
    eventually("p in the store", || {
        ext.app.read_state().unbound_pod("default", "p").is_some()
    })
    .await;
    fake.clear_requests();
    let v = post(ext.addr, "/bind", &bind_args(&p, "n")).await;
    assert_eq!(v["Error"], "");
    let gets = |name: &str| {
        fake.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path_and_query.ends_with(&format!("/pods/{name}")))
            .count()
    };
    assert_eq!(gets("p"), 0, "no GET: the reflector's copy was used");
    eventually("q in the store", || {
        ext.app.read_state().unbound_pod("default", "q").is_some()
    })
    .await;
    fake.fail_next("PATCH", "/pods/q", 409, 1);
    let v = post(ext.addr, "/bind", &bind_args(&q, "m")).await;
    assert_eq!(v["Error"], "", "retried from a GET");
    assert_eq!(gets("q"), 1);
    assert!(
        fake.events().iter().all(|e| e["reason"] != "BindingFailed"),
        "a retried conflict is not a failure"
    );
    eventually("books = truth", || {
        busy(ext.app.read_state().gpu_usage()) == ground_truth(&fake.pods())
    })
    .await;
}
