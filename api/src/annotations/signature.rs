//! The scheduler's signature over a pod's device decision, `hami.io/vgpu-decision-signature` (ours).
//!
//! HAMi's device plugin takes a pod's devices from `hami.io/vgpu-devices-to-allocate` as written, so a
//! pod that writes the annotations itself gets any GPU with any limits, unaccounted (peer bug C18). Here
//! the scheduler signs every decision it writes, and the device plugin refuses a decision whose
//! signature does not verify for that pod UID and node. The signature is HMAC-SHA256 (RFC 2104, FIPS
//! 180-4) under a key shared by the scheduler and the agents (a Kubernetes Secret), over
//!
//! ```text
//! "hami-decision-v1\n" + pod UID + "\n" + node name + "\n" + hami.io/vgpu-devices-allocated value
//! ```
//!
//! written as `v1:` followed by 64 lowercase hex digits. Binding the UID means a signed decision cannot be
//! copied onto another pod; binding the node means it cannot be replayed elsewhere.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Annotation key of the signature.
pub const DECISION_SIGNATURE: &str = "hami.io/vgpu-decision-signature";

/// Prefix of the current signature format.
const PREFIX: &str = "v1:";

fn mac(key: &[u8], pod_uid: &str, node: &str, devices_allocated: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    for part in ["hami-decision-v1", pod_uid, node, devices_allocated] {
        m.update(part.as_bytes());
        m.update(b"\n");
    }
    m
}

/// The signature value for a decision: `v1:` + 64 hex digits.
#[must_use]
pub fn sign_decision(key: &[u8], pod_uid: &str, node: &str, devices_allocated: &str) -> String {
    let tag = mac(key, pod_uid, node, devices_allocated).finalize().into_bytes();
    let mut out = String::with_capacity(PREFIX.len() + 64);
    out.push_str(PREFIX);
    for b in tag {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

/// Whether `signature` is a valid signature of this decision under `key` (constant-time comparison).
/// A malformed signature is simply not valid.
#[must_use]
pub fn verify_decision(
    key: &[u8],
    pod_uid: &str,
    node: &str,
    devices_allocated: &str,
    signature: &str,
) -> bool {
    let Some(hex) = signature.strip_prefix(PREFIX) else {
        return false;
    };
    if hex.len() != 64 {
        return false;
    }
    let mut tag = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => tag[i] = (h << 4) | l,
            _ => return false,
        }
    }
    mac(key, pod_uid, node, devices_allocated)
        .verify_slice(&tag)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_only_the_same_decision() {
        let key = b"secret";
        let v = "GPU-a,NVIDIA,1000,30:;";
        let s = sign_decision(key, "u1", "node-1", v);
        assert!(s.starts_with("v1:") && s.len() == 67);
        assert!(verify_decision(key, "u1", "node-1", v, &s));
        assert!(
            !verify_decision(key, "u2", "node-1", v, &s),
            "copied to another pod"
        );
        assert!(
            !verify_decision(key, "u1", "node-2", v, &s),
            "replayed on another node"
        );
        assert!(
            !verify_decision(key, "u1", "node-1", "GPU-a,NVIDIA,20000,100:;", &s),
            "limits raised"
        );
        assert!(!verify_decision(b"other", "u1", "node-1", v, &s), "other key");
        assert!(!verify_decision(key, "u1", "node-1", v, "v1:zz"));
        assert!(!verify_decision(key, "u1", "node-1", v, &s.to_uppercase()));
        // Field boundaries are part of the signed text.
        assert_ne!(
            sign_decision(key, "u1", "node-1x", v),
            sign_decision(key, "u1x", "node-1", v)
        );
    }
}
