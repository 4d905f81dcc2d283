//! The pure state core, without I/O: events from the API in, allocations and verdicts out.
//! Peer cases C03 (deletes), C05 (health), C02/C14 (init containers in the annotation), plus staleness,
//! malformed annotations, relists, the pending-allocation rule and the race for the last slot.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::{NOW, gpu_ctr, gpu_pod, gpus, node, node_with_usage, pod_with};
use hami_api::annotations::{
    BIND_PHASE, BIND_TIME, DEVICE_CORDON, DEVICES_ALLOCATED, DEVICES_TO_ALLOCATE, NODE_NVIDIA_REGISTER,
    NODE_NVIDIA_USAGE, VGPU_NODE,
};
use hami_scheduler::{
    config::PolicyChoice,
    error::Error,
    state::{SchedulerState, Settings, Verdicts},
};
use k8s_openapi::api::core::v1::{Pod, PodStatus};

fn state() -> SchedulerState {
    SchedulerState::new(Settings::default())
}

fn with_annotations(mut p: Pod, kv: &[(&str, &str)]) -> Pod {
    let ann = p.metadata.annotations.get_or_insert_with(BTreeMap::new);
    for (k, v) in kv {
        ann.insert((*k).to_owned(), (*v).to_owned());
    }
    p
}

/// A pod bound to `node` holding `alloc` (HAMi's annotation value).
fn allocated(name: &str, node: &str, alloc: &str) -> Pod {
    let mut p = with_annotations(
        gpu_pod(name, 1, 1000, 10),
        &[
            (VGPU_NODE, node),
            (DEVICES_ALLOCATED, alloc),
            (BIND_PHASE, "success"),
        ],
    );
    if let Some(s) = p.spec.as_mut() {
        s.node_name = Some(node.to_owned());
    }
    p
}

fn verdicts(st: &SchedulerState, pod: &Pod, nodes: &[&str]) -> Verdicts {
    let names: Vec<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
    st.evaluate_nodes(pod, &names, &HashMap::new(), NOW)
        .expect("valid pod")
        .expect("a GPU pod")
}

fn usage(st: &SchedulerState, uuid: &str) -> (u32, u64, u32) {
    st.gpu_usage().get(uuid).copied().unwrap_or_default()
}

/// Allocations are rebuilt exactly as annotated, whichever of node and pod arrives first.
#[test]
fn allocations_are_rebuilt_exactly_in_any_order() {
    let n = node("n1", &gpus("n1", 2, 16_000));
    let p = allocated("p", "n1", "GPU-n1-1,NVIDIA,3000,30:;");
    let mut a = state();
    assert!(a.apply_node(&n).is_empty());
    assert!(a.apply_pod(&p).is_empty());
    let mut b = state();
    assert!(b.apply_pod(&p).is_empty());
    assert!(!b.holds("uid-p"), "no node yet: nothing accounted");
    assert!(b.apply_node(&n).is_empty());
    assert_eq!(a.gpu_usage(), b.gpu_usage());
    assert_eq!(usage(&a, "GPU-n1-1"), (1, 3000, 30));
    assert_eq!(usage(&a, "GPU-n1-0"), (0, 0, 0));
}

/// C03: a delete releases exactly that UID, as a tombstone-like object without annotations too; a
/// second delete is a no-op; a stale delete for u1 never releases the new same-name pod u2; an update
/// without the annotations releases as well.
#[test]
fn c03_deletes_release_exactly_that_uid() {
    let gs = gpus("n", 8, 81_920);
    let all: String = gs
        .iter()
        .map(|g| format!("{},NVIDIA,81920,100:", g.uuid))
        .collect::<String>()
        + ";";
    let mut st = state();
    st.apply_node(&node("n", &gs));
    let p = allocated("p", "n", &all);
    st.apply_pod(&p);
    let q = gpu_pod("q", 8, 81_920, 100);
    let v = verdicts(&st, &q, &["n"]);
    assert_eq!(v.failed["n"], "8/8 CardInsufficientMemory");
    // (b) the delete notice carries no annotations (only the identity).
    let mut bare = gpu_pod("p", 1, 1, 1);
    bare.metadata.uid = Some("uid-p".into());
    st.delete_pod(&bare);
    assert!(!st.holds("uid-p"));
    assert!(st.gpu_usage().values().all(|u| *u == (0, 0, 0)));
    assert_eq!(verdicts(&st, &q, &["n"]).fits.len(), 1);
    st.delete_pod(&bare);
    assert!(
        st.gpu_usage().values().all(|u| *u == (0, 0, 0)),
        "second delete is a no-op"
    );
    // A new pod with the same name and UID u2 takes the node; a late delete for u1 leaves it.
    let mut p2 = allocated("p", "n", &all);
    p2.metadata.uid = Some("u2".into());
    st.apply_pod(&p2);
    st.delete_pod(&p);
    assert!(st.holds("u2"));
    assert_eq!(usage(&st, &gs[0].uuid), (1, 81_920, 100));
    // An update without the annotations releases (HAMi returned early there).
    let mut stripped = p2.clone();
    stripped.metadata.annotations = None;
    st.apply_pod(&stripped);
    assert!(!st.holds("u2"));
}

/// Succeeded/Failed pods hold nothing; a failed bind that never bound holds nothing; a relist that no
/// longer has a pod releases it (the kube-rs form of a tombstone).
#[test]
fn terminal_failed_and_relisted_pods_release() {
    let mut st = state();
    st.apply_node(&node("n", &gpus("n", 2, 16_000)));
    let a = allocated("a", "n", "GPU-n-0,NVIDIA,1000,10:;");
    let b = allocated("b", "n", "GPU-n-1,NVIDIA,1000,10:;");
    st.apply_pod(&a);
    st.apply_pod(&b);
    let mut done = a.clone();
    done.status = Some(PodStatus {
        phase: Some("Succeeded".into()),
        ..PodStatus::default()
    });
    st.apply_pod(&done);
    assert!(!st.holds("uid-a"));
    let mut failed = with_annotations(b.clone(), &[(BIND_PHASE, "failed")]);
    if let Some(s) = failed.spec.as_mut() {
        s.node_name = None;
    }
    st.apply_pod(&failed);
    assert!(!st.holds("uid-b"), "bind failed before binding");
    st.apply_pod(&b);
    assert!(st.holds("uid-b"));
    st.begin_pod_resync();
    st.apply_pod(&a);
    st.end_pod_resync();
    assert!(!st.holds("uid-b"), "gone from the relist");
    assert!(st.holds("uid-a"));
}

/// A pod this extender bound and then deleted while the pod watch was down: a relist that began after
/// the bind finished and lacks the pod releases it (found by a CI run under load: the slots stayed held
/// for good). A bind that finishes during the relist is kept: the list may predate its write.
#[test]
fn c03_a_bound_pod_deleted_while_the_watch_was_down_is_released_by_the_relist() {
    let mut st = state();
    st.apply_node(&node("n", &gpus("n", 1, 16_384)));
    let a = gpu_pod("a", 1, 4000, 10);
    st.prepare_bind(&a, "n", NOW).expect("fits");
    st.finish_bind("uid-a");
    assert!(st.holds("uid-a"));
    // B's bind is still being written when the watch drops.
    let b = gpu_pod("b", 1, 4000, 10);
    st.prepare_bind(&b, "n", NOW).expect("fits");
    // The watch drops; A is deleted meanwhile; the relist has neither.
    st.begin_pod_resync();
    st.finish_bind("uid-b");
    st.end_pod_resync();
    assert!(!st.holds("uid-a"), "deleted while the watch was down");
    assert!(
        st.holds("uid-b"),
        "bound during the relist: the list may predate it"
    );
    assert_eq!(usage(&st, "GPU-n-0"), (1, 4000, 10));
}

/// C30, after the first sync: every pod relist (a dropped watch) makes the pod view incomplete again,
/// and binds and filters are refused until it ends; then they are decided on the relisted view.
#[test]
fn c30_decisions_wait_for_every_relist_not_only_the_first() {
    let mut st = state();
    st.apply_node(&node("n", &gpus("n", 1, 16_384)));
    let a = gpu_pod("a", 1, 4000, 10);
    st.begin_pod_resync();
    let e = st.prepare_bind(&a, "n", NOW).expect_err("relisting");
    assert!(matches!(e, Error::NotSynced { .. }), "{e:?}");
    let names = vec!["n".to_owned()];
    let e = st
        .evaluate_nodes(&a, &names, &HashMap::new(), NOW)
        .expect_err("relisting");
    assert!(matches!(e, Error::NotSynced { .. }), "{e:?}");
    st.end_pod_resync();
    st.prepare_bind(&a, "n", NOW).expect("synced again");
}

/// C02/C14: a GPU-less init container keeps its empty segment; init containers count once (peak), not
/// summed with the app containers.
#[test]
fn c02_c14_init_containers_in_the_annotation() {
    let mut st = state();
    st.apply_node(&node("n", &gpus("n", 2, 16_384)));
    let p = pod_with(
        "p",
        vec![gpu_ctr("init", 1, 10_240, 0)],
        vec![gpu_ctr("a", 1, 2500, 25), gpu_ctr("b", 1, 2500, 25)],
    );
    let p = with_annotations(
        p,
        &[
            (VGPU_NODE, "n"),
            (
                DEVICES_ALLOCATED,
                "GPU-n-0,NVIDIA,10240,0:;GPU-n-0,NVIDIA,2500,25:;GPU-n-1,NVIDIA,2500,25:;",
            ),
        ],
    );
    assert!(st.apply_pod(&p).is_empty());
    // GPU 0: max(init 10240, app 2500) = 10240, not 12740.
    assert_eq!(usage(&st, "GPU-n-0").1, 10_240);
    assert_eq!(usage(&st, "GPU-n-1"), (1, 2500, 25));
    let q = pod_with(
        "q",
        vec![ctr_plain("setup")],
        vec![gpu_ctr("a", 1, 2500, 25), gpu_ctr("b", 1, 2500, 25)],
    );
    let mut st2 = state();
    st2.apply_node(&node("n", &gpus("n", 2, 16_384)));
    let plan = st2.prepare_bind(&q, "n", NOW).expect("fits");
    let enc = plan.devices.expect("GPU pod").encode().expect("encodable");
    assert!(enc.starts_with(';'), "empty init segment first: {enc}");
    assert_eq!(enc.matches(';').count(), 3, "{enc}");
}

fn ctr_plain(name: &str) -> k8s_openapi::api::core::v1::Container {
    common::ctr(name, &[])
}

/// C05: an unhealthy GPU fails with "1/1 CardNotHealth"; a healthy one beside it is chosen; once the
/// agent reports it healthy again it is schedulable without a restart; an allocation on a GPU that
/// turned unhealthy stays accounted.
#[test]
fn c05_health_flips() {
    let mut st = state();
    let mut gs = gpus("n", 1, 16_000);
    gs[0].healthy = false;
    st.apply_node(&node("n", &gs));
    let pod = common::gpu_share_pod("p", 10, 20);
    let v = verdicts(&st, &pod, &["n"]);
    assert_eq!(v.unresolvable["n"], "1/1 CardNotHealth");
    gs[0].healthy = true;
    st.apply_node(&node("n", &gs));
    assert_eq!(
        verdicts(&st, &pod, &["n"]).fits.len(),
        1,
        "recovers without restart"
    );
    st.apply_pod(&allocated("x", "n", "GPU-n-0,NVIDIA,4000,50:;"));
    gs[0].healthy = false;
    st.apply_node(&node("n", &gs));
    assert_eq!(
        usage(&st, "GPU-n-0"),
        (1, 4000, 50),
        "still accounted while unhealthy"
    );
}

/// Nodes without inventory, with a stale or missing heartbeat, or with malformed annotations are
/// unschedulable with a clear reason, and the malformed ones are reported (never read as empty).
#[test]
fn unschedulable_nodes_say_why() {
    let mut st = state();
    let gs = gpus("x", 1, 16_000);
    st.apply_node(&node_with_usage("stale", &gs, Some(NOW - 91), &[]));
    st.apply_node(&node_with_usage("silent", &gs, None, &[]));
    let mut bad = node("bad", &gs);
    bad.metadata.annotations.as_mut().expect("annotations").insert(
        NODE_NVIDIA_REGISTER.into(),
        "[{\"id\":\"GPU-a\",\"devmem\":\"lots\"}]".into(),
    );
    let problems = st.apply_node(&bad);
    assert_eq!(problems.len(), 1, "{problems:?}");
    let mut bad_usage = node("badusage", &gs);
    bad_usage
        .metadata
        .annotations
        .as_mut()
        .expect("annotations")
        .insert(NODE_NVIDIA_USAGE.into(), "{\"version\":9}".into());
    assert_eq!(st.apply_node(&bad_usage).len(), 1);
    let mut bare = node("bare", &gs);
    bare.metadata.annotations = None;
    st.apply_node(&bare);
    let v = verdicts(
        &st,
        &gpu_pod("p", 1, 1000, 10),
        &["stale", "silent", "bad", "badusage", "bare", "nowhere"],
    );
    assert!(v.fits.is_empty() && v.failed.is_empty(), "{v:?}");
    let why = |n: &str| v.unresolvable[n].clone();
    assert!(
        why("stale").contains("stale heartbeat") && why("stale").contains("91s"),
        "{}",
        why("stale")
    );
    assert!(why("silent").contains("no heartbeat"), "{}", why("silent"));
    assert!(
        why("bad").contains("invalid hami.io/node-nvidia-register"),
        "{}",
        why("bad")
    );
    assert!(
        why("badusage").contains("invalid hami.io/node-nvidia-usage"),
        "{}",
        why("badusage")
    );
    assert!(
        why("bare").contains("no hami.io/node-nvidia-register"),
        "{}",
        why("bare")
    );
    assert!(why("nowhere").contains("unknown node"), "{}", why("nowhere"));
    let counts = st.node_counts(NOW);
    assert_eq!((counts.stale, counts.invalid, counts.no_inventory), (2, 2, 1));
}

/// The pending-allocation rule (module docs of `state`): a different decision of the same device count
/// waits while another pod is between bind and Allocate; an identical one does not; Allocate finishing
/// (or the timeout) clears it.
#[test]
fn pending_allocation_conflict() {
    // GPU binpack, so a second identical request gets the very same GPU.
    let mut st = SchedulerState::new(Settings {
        policy: PolicyChoice::Hami {
            node: hami_api::NodePolicy::Binpack,
            gpu: hami_api::GpuPolicy::Binpack,
        },
        ..Settings::default()
    });
    st.apply_node(&node("n", &gpus("n", 2, 16_000)));
    let a = gpu_pod("a", 1, 2000, 10);
    let plan = st.prepare_bind(&a, "n", NOW).expect("fits");
    let enc = plan.devices.expect("GPU pod").encode().expect("encodable");
    let same = gpu_pod("same", 1, 2000, 10);
    assert_eq!(
        verdicts(&st, &same, &["n"]).fits.len(),
        1,
        "identical decisions do not conflict"
    );
    let other = gpu_pod("other", 1, 3000, 10);
    let v = verdicts(&st, &other, &["n"]);
    assert!(v.failed["n"].starts_with("PendingAllocationConflict"), "{v:?}");
    assert_eq!(
        verdicts(&st, &gpu_pod("two", 2, 3000, 10), &["n"]).fits.len(),
        1,
        "other count"
    );
    // The echo of the bind, then the device plugin's success.
    let mut echoed = with_annotations(
        a.clone(),
        &[
            (VGPU_NODE, "n"),
            (DEVICES_ALLOCATED, enc.as_str()),
            (DEVICES_TO_ALLOCATE, enc.as_str()),
            (BIND_PHASE, "allocating"),
            (BIND_TIME, &NOW.to_string()),
        ],
    );
    st.apply_pod(&echoed);
    assert!(verdicts(&st, &other, &["n"]).fits.is_empty());
    st.apply_node(&node_with_usage("n", &gpus("n", 2, 16_000), Some(NOW + 300), &[]));
    let later = st
        .evaluate_nodes(&other, &["n".into()], &HashMap::new(), NOW + 301)
        .expect("ok");
    assert_eq!(
        later.expect("gpu").fits.len(),
        1,
        "times out after nodeLockTimeout"
    );
    echoed = with_annotations(echoed, &[(DEVICES_TO_ALLOCATE, ";"), (BIND_PHASE, "success")]);
    st.apply_pod(&echoed);
    // Back to a heartbeat that is current at NOW (one 300 s ahead is not trusted, C28).
    st.apply_node(&node_with_usage("n", &gpus("n", 2, 16_000), Some(NOW - 10), &[]));
    assert_eq!(verdicts(&st, &other, &["n"]).fits.len(), 1, "Allocate done");
    assert!(st.holds("uid-a"));
}

/// Two binds decided on the same state for the last slot: exactly one wins; the loser fails with a
/// reason and nothing of it is accounted. A stale event without annotations does not release an
/// assumption whose patch has not been seen yet.
#[test]
fn last_slot_race_and_unseen_assumptions() {
    let mut st = state();
    let mut gs = gpus("n", 1, 16_000);
    gs[0].split_count = 1;
    st.apply_node(&node("n", &gs));
    let a = gpu_pod("a", 1, 1000, 10);
    let b = gpu_pod("b", 1, 1000, 10);
    assert_eq!(verdicts(&st, &b, &["n"]).fits.len(), 1);
    st.prepare_bind(&a, "n", NOW).expect("first wins");
    let e = st.prepare_bind(&b, "n", NOW).expect_err("second loses");
    assert!(
        matches!(e, Error::NodeUnfit { .. } | Error::Placement { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("CardTimeSlicingExhausted"), "{e}");
    assert!(!st.holds("uid-b"));
    st.apply_pod(&a);
    assert!(
        st.holds("uid-a"),
        "an event older than the bind's patch does not release it"
    );
    assert!(matches!(
        st.prepare_bind(&a, "n", NOW),
        Err(Error::PodMismatch { .. })
    ));
    st.abort_bind("uid-a");
    assert_eq!(usage(&st, "GPU-n-0"), (0, 0, 0));
}

/// Cordoned GPUs (`hami.io/device-cordon`) get no new allocations.
#[test]
fn cordoned_gpus_are_skipped() {
    let mut st = state();
    let mut n = node("n", &gpus("n", 2, 16_000));
    n.metadata
        .annotations
        .as_mut()
        .expect("annotations")
        .insert(DEVICE_CORDON.into(), "GPU-n-0".into());
    st.apply_node(&n);
    let plan = st
        .prepare_bind(&gpu_pod("p", 1, 1000, 10), "n", NOW)
        .expect("fits");
    assert_eq!(plan.devices.expect("gpu").0[0].0[0].uuid, "GPU-n-1");
    let v = verdicts(&st, &gpu_pod("two", 2, 1000, 10), &["n"]);
    assert!(v.unresolvable["n"].contains("cordoned"), "{v:?}");
}

/// The usage-aware policy through the state: measured memory near the top filters a GPU with
/// `MeasuredMemoryPressure` (resolvable: it clears when use drops).
#[test]
fn usage_aware_measured_pressure() {
    let settings = Settings {
        policy: PolicyChoice::UsageAware { margin_percent: 10 },
        ..Settings::default()
    };
    let mut st = SchedulerState::new(settings);
    st.apply_node(&node_with_usage(
        "n",
        &gpus("n", 1, 16_000),
        Some(NOW),
        &[(14_000, 50)],
    ));
    let v = verdicts(&st, &gpu_pod("p", 1, 1000, 10), &["n"]);
    assert_eq!(v.failed["n"], "1/1 MeasuredMemoryPressure");
    st.apply_node(&node_with_usage(
        "n",
        &gpus("n", 1, 16_000),
        Some(NOW),
        &[(2000, 50)],
    ));
    assert_eq!(verdicts(&st, &gpu_pod("p", 1, 1000, 10), &["n"]).fits.len(), 1);
}

/// Invalid HAMi resources are an error naming the pod, not a panic or a zero.
#[test]
fn invalid_pod_is_an_error() {
    let st = state();
    let p = pod_with(
        "p",
        vec![],
        vec![common::ctr("c", &[("nvidia.com/gpumem", "4Gi")])],
    );
    let e = st
        .evaluate_nodes(&p, &["n".into()], &HashMap::new(), NOW)
        .expect_err("invalid");
    assert!(
        e.to_string().contains("default/p") && e.to_string().contains("4Gi"),
        "{e}"
    );
    // A pod without managed resources passes untouched.
    let plain = pod_with("plain", vec![], vec![common::ctr("c", &[("cpu", "1")])]);
    assert!(
        st.evaluate_nodes(&plain, &["n".into()], &HashMap::new(), NOW)
            .expect("ok")
            .is_none()
    );
}
