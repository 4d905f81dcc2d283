//! The shared region as the interceptor and the agent read it, with a header (and first slots) of
//! arbitrary bytes, as a tenant may write them: validation and every accessor never panic; a
//! reservation that succeeds keeps the container within the limit it was checked against; releases
//! never make the reserved total wrap.
#![no_main]

use std::sync::atomic::Ordering;

use hami_api::region::{MAX_DEVICES, REGION_SIZE, Region};
use libfuzzer_sys::fuzz_target;

/// A region whose first bytes are `data` and the rest zero (what a tenant-written file maps to).
fn region_of(data: &[u8]) -> Box<Region> {
    let layout = std::alloc::Layout::new::<Region>();
    #[allow(unsafe_code, reason = "building a Region from bytes, as mmap does")]
    // SAFETY: the layout is Region's; any bytes are a valid Region (integer atomics only); the copy
    // stays inside the REGION_SIZE-byte allocation.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout);
        assert!(!p.is_null());
        std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len().min(REGION_SIZE));
        Box::from_raw(p.cast::<Region>())
    }
}

fuzz_target!(|data: &[u8]| {
    let (ops, bytes) = data.split_at(data.len().min(16));
    let r = region_of(bytes);
    let _ = r.validate();
    let n = r.device_count();
    assert!(n <= MAX_DEVICES);
    for d in 0..=MAX_DEVICES {
        let _ = (r.limit(d), r.sm_limit(d), r.used(d), r.suspended(d));
    }
    let _ = (r.cgroup_id(), r.any_suspended());
    let Ok(slot) = r.attach(4242, |pid| pid % 2 == 0) else {
        return;
    };
    for op in ops {
        let dev = usize::from(op & 0x0f);
        let amount = u64::from(op >> 4) << 20;
        let before = r.used(dev);
        if op & 0x80 == 0 {
            if r.try_reserve(slot, dev, amount, |pid| pid % 2 == 0).is_ok() && amount > 0 {
                let limit = r.limit(dev);
                let now = r
                    .header
                    .reserved_bytes
                    .get(dev)
                    .map_or(0, |x| x.load(Ordering::Relaxed));
                assert!(now <= limit || before >= limit, "dev {dev}: {now} > {limit}");
            }
        } else {
            r.release(slot, dev, amount);
        }
    }
    r.detach(slot);
    let _ = r.reclaim_dead(|_| false);
});
