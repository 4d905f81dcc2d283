//! The NVIDIA RM ioctl decoders the eBPF programs run (`hami_ebpf_common::decode`), on arbitrary
//! parameter bytes for each driver layout generation: never panic, for any escape number, size and
//! memory (pointers into the buffer or anywhere else).
#![no_main]

use hami_ebpf_common::{AbiConfig, decode, nv};
use libfuzzer_sys::fuzz_target;

/// User memory: `bytes` mapped at [`BASE`]; everything else unreadable.
struct Mem<'a> {
    bytes: &'a [u8],
}

const BASE: u64 = 0x7f00_0000_0000;

impl Mem<'_> {
    fn at<const N: usize>(&self, base: u64, off: u32) -> Option<[u8; N]> {
        let start = usize::try_from(base.checked_add(u64::from(off))?.checked_sub(BASE)?).ok()?;
        self.bytes.get(start..start.checked_add(N)?)?.try_into().ok()
    }
}

impl decode::Reader for Mem<'_> {
    fn u32_at(&self, base: u64, off: u32) -> Option<u32> {
        self.at::<4>(base, off).map(u32::from_le_bytes)
    }
    fn u64_at(&self, base: u64, off: u32) -> Option<u64> {
        self.at::<8>(base, off).map(u64::from_le_bytes)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let abi = AbiConfig::ALL[usize::from(head) % AbiConfig::ALL.len()];
    let mem = Mem { bytes: rest };
    // The size the ioctl names: the real ones often, any value sometimes.
    let sizes = [
        nv::NVOS21_SIZE,
        abi.nvos64_size,
        u32::from(head >> 1),
        u32::try_from(rest.len()).unwrap_or(u32::MAX),
    ];
    for size in sizes {
        for arg in [BASE, BASE + 8, 0, u64::MAX - 4] {
            let _ = decode::rm_alloc(&mem, arg, size, &abi);
            let _ = decode::rm_free(&mem, arg, size);
            let _ = decode::vid_heap(&mem, arg, size);
            for nr in [
                nv::ESC_RM_ALLOC,
                nv::ESC_RM_FREE,
                nv::ESC_RM_VID_HEAP_CONTROL,
                u32::from(head),
            ] {
                let _ = decode::requested_alloc(&mem, nr, arg, size, &abi);
            }
        }
    }
});
