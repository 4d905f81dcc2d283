//! The extender's request bodies (ExtenderArgs for filter and prioritize, ExtenderBindingArgs), any
//! bytes: decoding never panics; a decoded filter request is answered without panicking, only with
//! nodes it was given, and never both as fitting and failed.
#![no_main]

use std::sync::{Arc, OnceLock};

use hami_api::GpuDevice;
use hami_scheduler::{
    http::{App, filter_args, prioritize_args},
    state::Settings,
    wire::{ExtenderArgs, ExtenderBindingArgs},
};
use libfuzzer_sys::fuzz_target;

/// An extender without an API client holding two registered nodes, one of them half used.
fn app() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| {
        let app = App::new(
            Settings::default(),
            None,
            b"k".to_vec(),
            Arc::new(|| 1_800_000_000),
        );
        {
            let mut st = app.write_state();
            for name in ["n1", "n2"] {
                let gpus: Vec<GpuDevice> = (0..2)
                    .map(|i| GpuDevice::new(format!("GPU-{name}-{i}"), i, "NVIDIA-A100", 40_960))
                    .collect();
                let register = hami_api::encode_node_register(&gpus).unwrap_or_default();
                let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "annotations": {
                        "hami.io/node-nvidia-register": register,
                        "hami.io/node-nvidia-usage":
                            "{\"version\":1,\"heartbeat\":1800000000,\"gpus\":[]}"
                    }}
                }))
                .unwrap_or_default();
                let _ = st.apply_node(&node);
            }
        }
        app
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<ExtenderBindingArgs>(data);
    let Ok(args) = serde_json::from_slice::<ExtenderArgs>(data) else {
        return;
    };
    let given: Vec<String> = match (&args.node_names, &args.nodes) {
        (Some(n), _) => n.clone(),
        (None, Some(l)) => l.items.iter().filter_map(|n| n.metadata.name.clone()).collect(),
        (None, None) => Vec::new(),
    };
    let out = filter_args(app(), &args);
    for n in out.node_names.iter().flatten() {
        assert!(given.contains(n), "answered with a node not given: {n}");
        assert!(!out.failed_nodes.contains_key(n) && !out.failed_and_unresolvable_nodes.contains_key(n));
    }
    let _ = prioritize_args(app(), &args);
});
