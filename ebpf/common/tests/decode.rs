//! The RM decoders on byte fixtures, for the three ioctl layout generations, including truncated,
//! unreadable and unknown payloads. Post-535 fixtures come from the simulated driver's independent
//! encoder (`hami_fake_gpu::abi`); older ones are laid out here from `nvos.h` of
//! NVIDIA/open-gpu-kernel-modules: 515.43.04–520.61.07 (NVOS21 `status` at 24; NVOS64 40 bytes, no
//! `flags`, `status` at 32) and 525.47.04–530.41.03 (NVOS64 40 bytes, `flags` at 32, `status` at 36).

use std::collections::BTreeMap;

use hami_ebpf_common::decode::{self, Decoded, Reader};
use hami_ebpf_common::{AbiConfig, nv};
use hami_fake_gpu::abi::{self as fake, RmAlloc, RmAllocVariant, RmFree};

/// Fake user memory: buffers at base addresses. Reads past a buffer's end are unreadable (`None`), as
/// `bpf_probe_read_user` fails on an unmapped page.
#[derive(Default)]
struct Mem(BTreeMap<u64, Vec<u8>>);

impl Mem {
    fn with(mut self, base: u64, bytes: Vec<u8>) -> Self {
        self.0.insert(base, bytes);
        self
    }
    fn slice(&self, base: u64, off: u32, n: usize) -> Option<&[u8]> {
        let (start, buf) = self.0.range(..=base).next_back()?;
        let at = usize::try_from(base - start).ok()? + off as usize;
        buf.get(at..at + n)
    }
}

impl Reader for Mem {
    fn u32_at(&self, base: u64, off: u32) -> Option<u32> {
        self.slice(base, off, 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64_at(&self, base: u64, off: u32) -> Option<u64> {
        self.slice(base, off, 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
}

const ARG: u64 = 0x1000;
const PARAMS: u64 = 0x9000;

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn alloc_595(variant: RmAllocVariant, class: u32, new: u32, status: u32) -> Vec<u8> {
    let mut b = variant.encode(&RmAlloc {
        h_root: 0xc100_0001,
        h_parent: 0xd000_0002,
        h_new: new,
        h_class: class,
        p_alloc_parms: PARAMS,
        params_size: 128,
        flags: 0,
    });
    put32(&mut b, variant.status_offset(), status);
    b
}

#[test]
fn rm_alloc_vidmem_since_535_both_variants() {
    let abi = AbiConfig::R535;
    for variant in [RmAllocVariant::Nvos21, RmAllocVariant::Nvos64] {
        let mem = Mem::default()
            .with(
                ARG,
                alloc_595(variant, nv::CLASS_MEMORY_LOCAL_USER, 0xcaf0_0001, 0),
            )
            .with(PARAMS, fake::vidmem_alloc_params(0xc100_0001, 6 << 20));
        let size = u32::try_from(variant.size()).unwrap();
        assert_eq!(
            decode::rm_alloc(&mem, ARG, size, &abi),
            Some(Decoded::Alloc {
                client: 0xc100_0001,
                parent: 0xd000_0002,
                handle: 0xcaf0_0001,
                bytes: 6 << 20
            }),
            "{variant:?}"
        );
        // The same bytes read with the wrong generation do not decode as a success of another size:
        // NVOS64 is 48 bytes since 535 and 40 before, so the size alone refuses it.
        if variant == RmAllocVariant::Nvos64 {
            assert_eq!(decode::rm_alloc(&mem, ARG, size, &AbiConfig::R525), None);
        }
    }
}

#[test]
fn rm_alloc_failure_is_reported_with_the_status() {
    let abi = AbiConfig::R535;
    let mem = Mem::default()
        .with(
            ARG,
            alloc_595(RmAllocVariant::Nvos21, nv::CLASS_MEMORY_LOCAL_USER, 0, 0x51),
        )
        .with(PARAMS, fake::vidmem_alloc_params(0xc100_0001, 1 << 40));
    assert_eq!(
        decode::rm_alloc(&mem, ARG, 32, &abi),
        Some(Decoded::AllocFailed {
            client: 0xc100_0001,
            parent: 0xd000_0002,
            bytes: 1 << 40,
            status: 0x51
        })
    );
}

#[test]
fn rm_alloc_525_layouts() {
    let abi = AbiConfig::R525;
    // NVOS21 before 535: no paramsSize, status at 24.
    let mut b = vec![0u8; 32];
    put32(&mut b, 0, 0xc1);
    put32(&mut b, 4, 0xd1);
    put32(&mut b, 8, 0x77);
    put32(&mut b, 12, nv::CLASS_MEMORY_LOCAL_USER);
    put64(&mut b, 16, PARAMS);
    put32(&mut b, 24, 0);
    put32(&mut b, 28, 0xdead); // would be `status` in the new layout
    let mut params = vec![0u8; 120]; // 120 bytes before 545; size still at 64
    put64(&mut params, 64, 4096);
    let mem = Mem::default().with(ARG, b.clone()).with(PARAMS, params.clone());
    assert_eq!(
        decode::rm_alloc(&mem, ARG, 32, &abi),
        Some(Decoded::Alloc {
            client: 0xc1,
            parent: 0xd1,
            handle: 0x77,
            bytes: 4096
        })
    );
    // Read as the new layout, the garbage at 28 is taken as a failure status: offsets matter.
    assert!(matches!(
        decode::rm_alloc(&mem, ARG, 32, &AbiConfig::R535),
        Some(Decoded::AllocFailed { status: 0xdead, .. })
    ));
    // NVOS64 before 535: 40 bytes, flags at 32, status at 36.
    let mut b = vec![0u8; 40];
    put32(&mut b, 0, 0xc1);
    put32(&mut b, 4, 0xd1);
    put32(&mut b, 8, 0x78);
    put32(&mut b, 12, nv::CLASS_MEMORY_LOCAL_USER);
    put64(&mut b, 16, PARAMS);
    put32(&mut b, 32, 0);
    put32(&mut b, 36, 0);
    let mem = Mem::default().with(ARG, b.clone()).with(PARAMS, params);
    assert!(matches!(
        decode::rm_alloc(&mem, ARG, 40, &abi),
        Some(Decoded::Alloc {
            handle: 0x78,
            bytes: 4096,
            ..
        })
    ));
    // FINN-serialized parameters are refused for vidmem (counted as malformed by the program).
    put32(&mut b, 32, nv::NVOS64_FLAGS_FINN_SERIALIZED);
    let mem = Mem::default().with(ARG, b);
    assert_eq!(decode::rm_alloc(&mem, ARG, 40, &abi), None);
}

#[test]
fn rm_alloc_515_layout_has_no_flags_and_status_at_32() {
    let abi = AbiConfig::R515;
    let mut params = vec![0u8; 120];
    put64(&mut params, 64, 8192);
    // NVOS64 of 515/520: hRoot, hObjectParent, hObjectNew, hClass, pAllocParms, pRightsRequested, status.
    let mut b = vec![0u8; 40];
    put32(&mut b, 0, 0xc1);
    put32(&mut b, 4, 0xd1);
    put32(&mut b, 8, 0x79);
    put32(&mut b, 12, nv::CLASS_MEMORY_LOCAL_USER);
    put64(&mut b, 16, PARAMS);
    put64(&mut b, 24, 0); // pRightsRequested
    put32(&mut b, 32, 0); // status
    put32(&mut b, 36, 0x1f); // padding: the 525 layout would read a failure here
    let mem = Mem::default().with(ARG, b.clone()).with(PARAMS, params.clone());
    let ok = Some(Decoded::Alloc {
        client: 0xc1,
        parent: 0xd1,
        handle: 0x79,
        bytes: 8192,
    });
    assert_eq!(decode::rm_alloc(&mem, ARG, 40, &abi), ok);
    assert!(matches!(
        decode::rm_alloc(&mem, ARG, 40, &AbiConfig::R525),
        Some(Decoded::AllocFailed { status: 0x1f, .. })
    ));
    // Bit 0 at 32 is the status here (a failure), never a FINN flag.
    put32(&mut b, 32, 1);
    put32(&mut b, 36, 0);
    let mem = Mem::default().with(ARG, b.clone()).with(PARAMS, params.clone());
    assert!(matches!(
        decode::rm_alloc(&mem, ARG, 40, &abi),
        Some(Decoded::AllocFailed {
            status: 1,
            bytes: 8192,
            ..
        })
    ));
    assert_eq!(
        decode::rm_alloc(&mem, ARG, 40, &AbiConfig::R525),
        None,
        "FINN for 525"
    );
    // The request the LSM program reads does not depend on a flags field either.
    put32(&mut b, 32, 0);
    let mem = Mem::default().with(ARG, b).with(PARAMS, params);
    assert_eq!(
        decode::requested_alloc(&mem, nv::ESC_RM_ALLOC, ARG, 40, &abi),
        Some((0xc1, 0xd1, 8192))
    );
    // NVOS21 is the same 32 bytes as in 525 (status at 24); 48-byte NVOS64 is not this generation.
    assert_eq!(decode::rm_alloc(&mem, ARG, 48, &abi), None);
}

#[test]
fn heap_size_range_and_tiled_pitch_height_use_their_own_offsets() {
    // ALLOC_SIZE_RANGE: size at 80, 2 MiB alignment at 88 (where ALLOC_SIZE keeps its size).
    let heap = fake::nvos32_alloc_size_range(0xc1, 0xd1, 0x56, 5 << 20);
    assert_eq!(
        fake::get_u64(&heap, 88),
        Some(2 << 20),
        "the fixture differs at 88"
    );
    let mem = Mem::default().with(ARG, heap.clone());
    let alloc = Some(Decoded::Alloc {
        client: 0xc1,
        parent: 0xd1,
        handle: 0x56,
        bytes: 5 << 20,
    });
    assert_eq!(decode::vid_heap(&mem, ARG, 184), alloc);
    assert_eq!(
        decode::requested_alloc(&mem, nv::ESC_RM_VID_HEAP_CONTROL, ARG, 184, &AbiConfig::R535),
        Some((0xc1, 0xd1, 5 << 20))
    );
    // TILED_PITCH_HEIGHT: the driver writes size = pitch * height back at 88; attr is at 64.
    let mut tiled = fake::nvos32_alloc_tiled(0xc1, 0xd1, 0x57, 4096, 768);
    put64(&mut tiled, 88, 4096 * 768);
    let mem = Mem::default().with(ARG, tiled.clone());
    assert_eq!(
        decode::vid_heap(&mem, ARG, 184),
        Some(Decoded::Alloc {
            client: 0xc1,
            parent: 0xd1,
            handle: 0x57,
            bytes: 3 << 20
        })
    );
    // Before the call, the LSM program computes the same size from pitch and height.
    put64(&mut tiled, 88, 0);
    let mem = Mem::default().with(ARG, tiled.clone());
    assert_eq!(
        decode::requested_alloc(&mem, nv::ESC_RM_VID_HEAP_CONTROL, ARG, 184, &AbiConfig::R535),
        Some((0xc1, 0xd1, 3 << 20))
    );
    // attr LOCATION = PCI at 64 makes it sysmem; the same bits at 56 (where AllocSize keeps attr,
    // here `height`) do not.
    put32(&mut tiled, 64, 1 << 25);
    let mem = Mem::default().with(ARG, tiled);
    assert_eq!(decode::vid_heap(&mem, ARG, 184), Some(Decoded::Ignored));
}

#[test]
fn device_and_subdevice_objects() {
    let abi = AbiConfig::R535;
    let mut dev_params = vec![0u8; 56];
    put32(&mut dev_params, 0, 3);
    let mem = Mem::default()
        .with(ARG, alloc_595(RmAllocVariant::Nvos64, nv::CLASS_DEVICE, 0xd0, 0))
        .with(PARAMS, dev_params);
    assert_eq!(
        decode::rm_alloc(&mem, ARG, 48, &abi),
        Some(Decoded::Device {
            client: 0xc100_0001,
            handle: 0xd0,
            device_id: 3
        })
    );
    let mem = Mem::default().with(
        ARG,
        alloc_595(RmAllocVariant::Nvos21, nv::CLASS_SUBDEVICE, 0x5d, 0),
    );
    assert_eq!(
        decode::rm_alloc(&mem, ARG, 32, &abi),
        Some(Decoded::Subdevice {
            client: 0xc100_0001,
            parent: 0xd000_0002,
            handle: 0x5d
        })
    );
    // Without parameters (null pAllocParms) RM takes device instance 0.
    let mut no_params = alloc_595(RmAllocVariant::Nvos64, nv::CLASS_DEVICE, 0xd1, 0);
    put64(&mut no_params, 16, 0);
    let mem = Mem::default().with(ARG, no_params);
    assert_eq!(
        decode::rm_alloc(&mem, ARG, 48, &abi),
        Some(Decoded::Device {
            client: 0xc100_0001,
            handle: 0xd1,
            device_id: 0
        })
    );
    // Parameters that cannot be read are malformed, not a guess.
    let mem = Mem::default().with(ARG, alloc_595(RmAllocVariant::Nvos64, nv::CLASS_DEVICE, 0xd2, 0));
    assert_eq!(decode::rm_alloc(&mem, ARG, 48, &abi), None);
    // A failed device allocation and other classes are ignored.
    let mem = Mem::default().with(
        ARG,
        alloc_595(RmAllocVariant::Nvos21, nv::CLASS_DEVICE, 0xd0, 0x1f),
    );
    assert_eq!(decode::rm_alloc(&mem, ARG, 32, &abi), Some(Decoded::Ignored));
    let mem = Mem::default().with(ARG, alloc_595(RmAllocVariant::Nvos21, 0x90F1, 0x9, 0));
    assert_eq!(decode::rm_alloc(&mem, ARG, 32, &abi), Some(Decoded::Ignored));
}

#[test]
fn truncated_unreadable_and_unknown_payloads_are_refused() {
    let abi = AbiConfig::R535;
    // Unknown ioctl sizes.
    let mem = Mem::default().with(ARG, vec![0u8; 64]);
    for size in [0, 8, 31, 33, 40, 64] {
        assert_eq!(decode::rm_alloc(&mem, ARG, size, &abi), None, "{size}");
    }
    assert_eq!(decode::rm_free(&mem, ARG, 12), None);
    assert_eq!(decode::vid_heap(&mem, ARG, 176), None);
    // The struct is shorter in memory than its declared size (truncated by an unmapped page).
    let full = alloc_595(RmAllocVariant::Nvos21, nv::CLASS_MEMORY_LOCAL_USER, 1, 0);
    let mem = Mem::default().with(ARG, full[..20].to_vec());
    assert_eq!(decode::rm_alloc(&mem, ARG, 32, &abi), None);
    // A successful vidmem allocation whose parameters are unreadable cannot be sized: refused.
    let mem = Mem::default().with(ARG, full);
    assert_eq!(decode::rm_alloc(&mem, ARG, 32, &abi), None);
    // A failed one is still reported, with 0 bytes.
    let mem = Mem::default().with(
        ARG,
        alloc_595(RmAllocVariant::Nvos21, nv::CLASS_MEMORY_LOCAL_USER, 0, 0x3d),
    );
    assert!(matches!(
        decode::rm_alloc(&mem, ARG, 32, &abi),
        Some(Decoded::AllocFailed {
            bytes: 0,
            status: 0x3d,
            ..
        })
    ));
}

#[test]
fn rm_free_and_heap_paths() {
    let mut b = RmFree {
        h_root: 0xc1,
        h_parent: 0xd1,
        h_old: 0x42,
    }
    .encode();
    let mem = Mem::default().with(ARG, b.clone());
    assert_eq!(
        decode::rm_free(&mem, ARG, 16),
        Some(Decoded::Free {
            client: 0xc1,
            handle: 0x42
        })
    );
    put32(&mut b, RmFree::STATUS_OFFSET, 0x57);
    let mem = Mem::default().with(ARG, b);
    assert_eq!(decode::rm_free(&mem, ARG, 16), Some(Decoded::Ignored));

    let mut heap = fake::nvos32_alloc_size(0xc1, 0xd1, 0x55, 3 << 20);
    let mem = Mem::default().with(ARG, heap.clone());
    assert_eq!(
        decode::vid_heap(&mem, ARG, 184),
        Some(Decoded::Alloc {
            client: 0xc1,
            parent: 0xd1,
            handle: 0x55,
            bytes: 3 << 20
        })
    );
    // VIRTUAL and sysmem (attr.LOCATION = PCI) allocations are not device memory.
    put32(&mut heap, 52, nv::NVOS32_ALLOC_FLAGS_VIRTUAL);
    let mem = Mem::default().with(ARG, heap.clone());
    assert_eq!(decode::vid_heap(&mem, ARG, 184), Some(Decoded::Ignored));
    put32(&mut heap, 52, 0);
    put32(&mut heap, 56, 1 << 25);
    let mem = Mem::default().with(ARG, heap.clone());
    assert_eq!(decode::vid_heap(&mem, ARG, 184), Some(Decoded::Ignored));
    put32(&mut heap, 56, 0);
    put32(&mut heap, 20, 0x51);
    let mem = Mem::default().with(ARG, heap);
    assert!(matches!(
        decode::vid_heap(&mem, ARG, 184),
        Some(Decoded::AllocFailed { status: 0x51, bytes, .. }) if bytes == 3 << 20
    ));
    let mem = Mem::default().with(ARG, fake::nvos32_free(0xc1, 0xd1, 0x55));
    assert_eq!(
        decode::vid_heap(&mem, ARG, 184),
        Some(Decoded::Free {
            client: 0xc1,
            handle: 0x55
        })
    );
}

#[test]
fn requested_allocations_before_the_call_and_the_shared_hard_limit_decision() {
    // What the LSM program reads before the driver runs: the request, whatever `status` holds.
    let abi = AbiConfig::R535;
    for variant in [RmAllocVariant::Nvos21, RmAllocVariant::Nvos64] {
        let mem = Mem::default()
            .with(ARG, alloc_595(variant, nv::CLASS_MEMORY_LOCAL_USER, 0, 0))
            .with(PARAMS, fake::vidmem_alloc_params(0xc100_0001, 6 << 20));
        let size = u32::try_from(variant.size()).unwrap();
        assert_eq!(
            decode::requested_alloc(&mem, nv::ESC_RM_ALLOC, ARG, size, &abi),
            Some((0xc100_0001, 0xd000_0002, 6 << 20)),
            "{variant:?}"
        );
        // Another class, another escape, or a truncated payload: not a device-memory request.
        let dev = Mem::default().with(ARG, alloc_595(variant, nv::CLASS_DEVICE, 0, 0));
        assert_eq!(
            decode::requested_alloc(&dev, nv::ESC_RM_ALLOC, ARG, size, &abi),
            None
        );
        assert_eq!(
            decode::requested_alloc(&mem, nv::ESC_RM_FREE, ARG, size, &abi),
            None
        );
        assert_eq!(
            decode::requested_alloc(&mem, nv::ESC_RM_ALLOC, ARG, size + 8, &abi),
            None
        );
    }
    // The kill path compares after the allocation (bytes 0), the LSM before it (bytes requested).
    let gib = 1u64 << 30;
    assert!(!hami_ebpf_common::over_hard_limit(600 << 20, 400 << 20, gib));
    assert!(hami_ebpf_common::over_hard_limit(600 << 20, 600 << 20, gib));
    assert!(hami_ebpf_common::over_hard_limit(1200 << 20, 0, gib));
    // C29: a zero limit holds every allocation; it never means "no limit".
    assert!(hami_ebpf_common::over_hard_limit(0, 1, 0), "0: nothing");
    assert!(hami_ebpf_common::over_hard_limit(1, 0, 0), "0: nothing");
    assert!(!hami_ebpf_common::over_hard_limit(0, 0, 0), "nothing held");
    assert!(hami_ebpf_common::over_hard_limit(u64::MAX, 1, gib), "no wrap");
}
