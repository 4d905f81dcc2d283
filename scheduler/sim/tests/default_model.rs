//! The extender's default workload model (`hami_policy::workload::ALIBABA_DEFAULT_SHAPES`) is the
//! embedded `default` trace's GPU demand, shape by shape: if the data or the trace reader change, the
//! table must follow.

use std::collections::BTreeMap;

use hami_api::MemoryRequest;
use hami_policy::workload::ALIBABA_DEFAULT_SHAPES;
use hami_sim::load_trace;

#[test]
fn default_model_table_matches_the_embedded_trace() {
    let pods = load_trace("default", None).expect("embedded trace");
    let mut counts: BTreeMap<(u32, u32), u32> = BTreeMap::new();
    for p in &pods {
        let Some(g) = p.request.containers.iter().find_map(|c| c.gpu.as_ref()) else {
            continue;
        };
        let MemoryRequest::Percent(pct) = g.memory else {
            panic!("{}: trace memory is a share", p.name);
        };
        assert_eq!(pct, g.cores, "{}: one share for memory and compute", p.name);
        assert!(
            g.selector.use_types.is_empty(),
            "{}: the default trace has no GPU type",
            p.name
        );
        *counts.entry((g.count, pct)).or_default() += 1;
    }
    let table: BTreeMap<(u32, u32), u32> = ALIBABA_DEFAULT_SHAPES
        .iter()
        .map(|&(c, p, n)| ((c, p), n))
        .collect();
    assert_eq!(table.len(), ALIBABA_DEFAULT_SHAPES.len(), "no shape listed twice");
    assert_eq!(counts, table);
}
