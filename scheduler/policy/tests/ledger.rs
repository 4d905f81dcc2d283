//! The allocation ledger's contract beyond peer case C03: refused commits are not recorded, entries
//! hold exactly what was committed, and the allocation annotation can be rebuilt from an entry.

mod common;

use common::{GIB, app, cluster, decide, gpu, gpus, mib, node, plain, pod, policy, single};
use hami_api::PodDevices;
use hami_policy::{DeviceGrant, Error, Ledger, NodePlacement};

/// A decision naming a node outside the cluster is refused with `NoSuchNode` and not recorded.
#[test]
fn assume_on_a_missing_node_is_refused_and_not_recorded() {
    let mut c = cluster(vec![node("n", gpus("", 1, 16 * GIB))]);
    let p = single("p", mib(1, GIB, 10));
    let mut d = decide(&c, policy("spread", &c).as_ref(), &p).expect("fits");
    d.node = 3;
    let mut ledger = Ledger::new();
    assert!(matches!(
        ledger.assume(&mut c, &p, &d),
        Err(Error::NoSuchNode { index: 3, len: 1 })
    ));
    assert!(ledger.is_empty());
    assert!(!ledger.contains("uid-p"));
    assert!(c.nodes[0].gpus.iter().all(|u| u.is_idle()));
}

/// Each entry records the node, the pod and the placement as committed; iteration is in UID order; and
/// forgetting one pod releases only its own use.
#[test]
fn entries_record_what_was_committed() {
    let mut c = cluster(vec![
        node("a", gpus("a", 2, 16 * GIB)),
        node("b", gpus("b", 2, 16 * GIB)),
    ]);
    let pol = policy("spread", &c);
    let mut ledger = Ledger::new();
    for name in ["z", "m", "a"] {
        let p = single(name, mib(1, 2 * GIB, 20));
        let d = decide(&c, pol.as_ref(), &p).expect("fits");
        ledger.assume(&mut c, &p, &d).expect("assume");
        let e = ledger.get(&p.uid).expect("recorded");
        assert_eq!((e.node, &e.pod, &e.placement), (d.node, &p, &d.placement));
    }
    let uids: Vec<&str> = ledger.iter().map(|(u, _)| u).collect();
    assert_eq!(uids, vec!["uid-a", "uid-m", "uid-z"]);
    assert_eq!((&ledger).into_iter().count(), 3);
    let total = |c: &hami_policy::Cluster| -> u64 {
        c.nodes.iter().flat_map(|n| &n.gpus).map(|u| u.memory_mib).sum()
    };
    assert_eq!(total(&c), 3 * 2 * GIB);
    assert!(ledger.forget(&mut c, "uid-m"));
    assert_eq!(total(&c), 2 * 2 * GIB);
    assert_eq!(ledger.len(), 2);
}

/// The allocation annotation rebuilt from a ledger entry (as after a scheduler restart) decodes back to
/// the placement's devices, segment for segment.
#[test]
fn annotation_is_rebuilt_from_an_entry() {
    let mut c = cluster(vec![node(
        "n",
        vec![gpu("GPU-A", 0, 16 * GIB), gpu("GPU-B", 1, 16 * GIB)],
    )]);
    let p = pod("p", "u1", vec![plain("setup"), app("train", mib(2, 3000, 30))]);
    let d = decide(&c, policy("binpack", &c).as_ref(), &p).expect("fits");
    let mut ledger = Ledger::new();
    ledger.assume(&mut c, &p, &d).expect("assume");
    let e = ledger.get("u1").expect("recorded");
    let value = e
        .placement
        .to_pod_devices(&c.nodes[e.node].inventory, "NVIDIA")
        .encode()
        .expect("encodable");
    assert_eq!(value, ";GPU-A,NVIDIA,3000,30:GPU-B,NVIDIA,3000,30:;");
    let decoded = PodDevices::decode(&value).expect("decodes");
    assert_eq!(decoded.0.len(), 2);
    assert!(decoded.container(0).expect("entry 0").is_empty());
}

/// `to_pod_devices` leaves out a grant naming a GPU the inventory does not have (such a placement cannot
/// pass commit), keeping one entry per container.
#[test]
fn to_pod_devices_skips_grants_outside_the_inventory() {
    let inv = common::inventory("n", vec![gpu("GPU-A", 0, 16 * GIB)]);
    let grant = |gpu| DeviceGrant {
        gpu,
        memory_mib: 100,
        cores: 1,
    };
    let placement = NodePlacement {
        containers: vec![vec![grant(0), grant(5)], vec![]],
    };
    let devices = placement.to_pod_devices(&inv, "NVIDIA");
    assert_eq!(devices.encode().expect("encodable"), "GPU-A,NVIDIA,100,1:;;");
}

/// An allocation read back from the API is restored even where it no longer fits (its GPU turned
/// unhealthy, or it exceeds capacity), so nothing running is lost from the books; forgetting it releases
/// exactly that charge, and a second restore under the same UID is refused.
#[test]
fn restore_accounts_what_no_longer_fits() {
    let mut c = cluster(vec![node("n", gpus("", 1, 16 * GIB))]);
    let p = single("p", mib(1, 10 * GIB, 60));
    let d = decide(&c, policy("binpack", &c).as_ref(), &p).expect("fits");
    let mut sick = c.nodes[0].inventory.as_ref().clone();
    sick.gpus[0].healthy = false;
    c.nodes[0] = hami_policy::NodeState::new(std::sync::Arc::new(sick));
    let mut ledger = Ledger::new();
    assert!(ledger.assume(&mut c, &p, &d).is_err(), "a new commit is checked");
    ledger.restore(&mut c, &p, &d).expect("restore is not");
    assert_eq!(c.nodes[0].gpus[0].memory_mib, 10 * GIB);
    // A second copy over capacity is still accounted under its own UID.
    let q = single("q", mib(1, 10 * GIB, 60));
    ledger.restore(&mut c, &q, &d).expect("restore");
    assert_eq!(c.nodes[0].gpus[0].memory_mib, 20 * GIB);
    assert!(matches!(
        ledger.restore(&mut c, &q, &d),
        Err(Error::PlacementShape { .. })
    ));
    assert!(ledger.forget(&mut c, "uid-q"));
    assert_eq!(c.nodes[0].gpus[0].memory_mib, 10 * GIB);
    assert_eq!(c.nodes[0].gpus[0].slots, 1);
}
