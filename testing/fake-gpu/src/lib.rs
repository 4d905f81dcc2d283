//! The simulated GPU node (test double; never linked into production binaries).
//!
//! - [`model`]: N GPUs, the RM object tree, per-process device-memory accounting, failure injection and
//!   ground truth.
//! - [`abi`]: the NVIDIA RM ioctl ABI of driver 595.45.04 (numbers, sizes, offsets, status codes).
//! - [`rm`]: what the driver does with one ioctl, against the model.
//! - [`fs`]: the FUSE directory serving `nvidiactl`, `nvidia<N>`, `hami-ground-truth.json` and
//!   `hami-control`; the mounting process is the state service every tenant process shares.
//! - [`node`]: the RAII [`node::FakeNode`] that mounts and unmounts it, and the privileged-test gate.
//! - [`client`]: a raw RM client issuing the real ioctls (tests, the `hami-fake-node alloc` tenant).
//! - [`Error`]: the crate's one error type.

pub mod abi;
pub mod client;
mod error;
pub mod fs;
pub mod model;
pub mod node;
pub mod rm;

pub use error::Error;
pub use model::{DeviceModel, GroundTruth};
pub use node::FakeNode;
