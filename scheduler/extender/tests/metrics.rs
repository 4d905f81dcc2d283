//! `GET /metrics` of the extender over loopback HTTP: what it exposes agrees with
//! `hami_scheduler::metrics::METRICS` (families, types, help, label names), and the allocation view,
//! pod info, pods by state, heartbeats, filter results and FGD fragmentation carry the values the state
//! implies.

mod common;

use common::{NOW, args_names, gpu_pod, gpus, http, node_with_usage, offline_extender, post};
use hami_scheduler::{metrics::METRICS, state::Settings};

/// The value of the sample `series` (exact name and labels as exposed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn exposition_matches_the_list_and_fragmentation_follows_fgd() {
    // Two nodes: "a" with two 10 000 MiB GPUs, "b" with one, each with a fresh heartbeat.
    let ext = offline_extender(
        Settings::default(),
        &[
            node_with_usage("a", &gpus("a", 2, 10_000), Some(NOW - 5), &[]),
            node_with_usage("b", &gpus("b", 1, 10_000), Some(NOW - 7), &[]),
        ],
    )
    .await;
    {
        // One pod holds 60 % of one GPU of "a" (memory and cores): the workload model is that shape.
        let mut st = ext.app.write_state();
        let plan = st
            .prepare_bind(&gpu_pod("x", 1, 6000, 60), "a", NOW)
            .expect("fits");
        assert_eq!(plan.node, "a");
    }
    // A filter that fits, and one that cannot (more memory than any GPU has).
    post(
        ext.addr,
        "/filter",
        &args_names(&gpu_pod("p", 1, 1000, 10), &["a", "b"]),
    )
    .await;
    post(
        ext.addr,
        "/filter",
        &args_names(&gpu_pod("q", 1, 20_000, 10), &["a", "b"]),
    )
    .await;
    let (status, body) = http(ext.addr, "/metrics", None).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf-8");

    // No webhook here: every other listed family has a sample, and nothing unlisted is exposed.
    let problems: Vec<String> = hami_api::metrics::check_exposition(METRICS, &text, true)
        .into_iter()
        .filter(|p| !p.starts_with("hami_webhook_"))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}\n{text}");

    let want = [
        ("hami_scheduler_filter_results_total{result=\"fit\"}", 1.0),
        ("hami_scheduler_filter_results_total{result=\"no_fit\"}", 1.0),
        ("hami_scheduler_pods{state=\"allocated\"}", 1.0),
        // Bound at NOW, not yet allocated by a device plugin, within the pending timeout.
        ("hami_scheduler_pods{state=\"pending\"}", 1.0),
        (
            "hami_scheduler_node_heartbeat_timestamp_seconds{node=\"a\"}",
            (NOW - 5) as f64,
        ),
        (
            "hami_scheduler_node_heartbeat_timestamp_seconds{node=\"b\"}",
            (NOW - 7) as f64,
        ),
        (
            "hami_pod_info{namespace=\"default\",node=\"a\",pod=\"x\",pod_uid=\"uid-x\"}",
            1.0,
        ),
        // a: 0.4 free on the used GPU + 1.0 on the idle one; b: one idle GPU.
        ("hami_node_gpu_unallocated_gpus{node=\"a\"}", 1.4),
        ("hami_node_gpu_unallocated_gpus{node=\"b\"}", 1.0),
        // The model's only shape (one GPU at 60 %) cannot use the 0.4 left on a's used GPU; everything
        // free on b can take it.
        ("hami_node_gpu_fragmented_gpus{node=\"a\"}", 0.4),
        ("hami_node_gpu_fragmented_gpus{node=\"b\"}", 0.0),
        // 0.4 fragmented GPUs out of 3.
        ("hami_cluster_gpu_fragmentation_ratio", 0.4 / 3.0),
    ];
    for (series, v) in want {
        let got = value(&text, series).unwrap_or_else(|| panic!("no {series}\n{text}"));
        assert!((got - v).abs() < 1e-9, "{series} = {got}, want {v}");
    }
    // The per-container allocation carries namespace and pod (per-namespace allocation).
    let vgpu: f64 = text
        .lines()
        .filter(|l| l.starts_with("hami_vgpu_memory_allocated_bytes{") && l.contains("namespace=\"default\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(vgpu, 6000.0 * 1_048_576.0);
}

#[tokio::test]
async fn without_held_pods_the_default_model_sees_no_fragmentation_on_idle_gpus() {
    let ext = offline_extender(
        Settings::default(),
        &[node_with_usage("a", &gpus("a", 2, 10_000), Some(NOW), &[])],
    )
    .await;
    let (_, body) = http(ext.addr, "/metrics", None).await;
    let text = String::from_utf8(body).expect("utf-8");
    // Every shape of the default model kept at 95 % coverage asks one GPU: idle GPUs take them all.
    assert_eq!(
        value(&text, "hami_node_gpu_fragmented_gpus{node=\"a\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "hami_node_gpu_unallocated_gpus{node=\"a\"}"),
        Some(2.0)
    );
    assert_eq!(
        value(&text, "hami_scheduler_pods{state=\"allocated\"}"),
        Some(0.0)
    );
    assert!(!text.contains("hami_pod_info{"), "{text}");
}
