//! The one error type of `hami-api`.
//!
//! Every variant names what was being read (the quantity, the env var, the annotation key, the record or
//! container position) and the offending text, so a caller can log it on the pod or node it came from
//! (`DESIGN.md` §3: "a malformed value is a clear, logged error … never a panic and never a silent zero").
//! [`Error::reason`] gives a stable snake_case label per variant for metrics and event reasons.

use std::fmt;

/// Result alias with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while parsing or encoding the contracts in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A Kubernetes `resource.Quantity` string is malformed, out of range, or not convertible to the
    /// requested unit (negative, fractional where an integer is needed). `input` is the text as given
    /// (for a conversion error, the quantity's plain decimal value).
    #[error("invalid quantity {input:?}: {detail}")]
    InvalidQuantity {
        /// The offending text.
        input: String,
        /// What is wrong with it.
        detail: &'static str,
    },

    /// An environment variable that carries a limit into a container (e.g. `CUDA_DEVICE_MEMORY_LIMIT_0`,
    /// `CUDA_DEVICE_SM_LIMIT`) has a value that is not a valid limit.
    #[error("invalid {var} value {input:?}: {detail}")]
    InvalidEnvValue {
        /// The variable name (for the per-device memory limit, its prefix `CUDA_DEVICE_MEMORY_LIMIT`).
        var: &'static str,
        /// The offending value.
        input: String,
        /// What is wrong with it.
        detail: &'static str,
    },

    /// An annotation value is not valid JSON of the expected shape at the top level (e.g. the node
    /// register annotation is not a JSON array). `message` is the JSON parser's message with its position.
    #[error("annotation {key}: invalid JSON: {message}")]
    InvalidJson {
        /// The annotation key.
        key: &'static str,
        /// The JSON parser's message (with line and column).
        message: String,
    },

    /// The node register annotation (`hami.io/node-nvidia-register`) has a malformed device record.
    #[error("annotation {key}: {}: {detail}{}", location("record", .record, .field), shown(.value))]
    InvalidNodeRegister {
        /// The annotation key.
        key: &'static str,
        /// 0-based position of the device record, `None` for a problem with the whole value.
        record: Option<usize>,
        /// The field name (`id`, `devmem`, … or an extension field), `None` for the whole record.
        field: Option<&'static str>,
        /// The offending text (empty when there is nothing useful to show).
        value: String,
        /// What is wrong with it.
        detail: &'static str,
    },

    /// A pod allocation annotation (`hami.io/vgpu-devices-allocated` / `-to-allocate`) is malformed.
    #[error("pod devices annotation: {}: {detail}{}", pod_location(.container, .device, .field), shown(.value))]
    InvalidPodDevices {
        /// 0-based container segment (init containers first).
        container: usize,
        /// 0-based device entry inside the segment, `None` for a problem with the segment.
        device: Option<usize>,
        /// The field (`uuid`, `type`, `usedmem`, `usedcores`), `None` for the whole device or segment.
        field: Option<&'static str>,
        /// The offending text.
        value: String,
        /// What is wrong with it.
        detail: &'static str,
    },

    /// A pod or node annotation that selects or tunes scheduling (`nvidia.com/numa-bind`,
    /// `hami.io/gpu-scheduler-policy`, `hami.io/device-scoring-weights`, …) has an invalid value.
    #[error("annotation {key}: invalid value {value:?}: {detail}")]
    InvalidAnnotation {
        /// The annotation key.
        key: &'static str,
        /// The offending value (or the offending item of a list).
        value: String,
        /// What is wrong with it.
        detail: &'static str,
    },

    /// A container's resource request or limit (`nvidia.com/gpumem`, `cpu`, …) has a value the scheduler
    /// does not accept (negative, fractional, out of range).
    #[error("container {container:?}: resource {resource} = {value:?}: {detail}")]
    InvalidResource {
        /// The container name.
        container: String,
        /// The resource name.
        resource: String,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        detail: &'static str,
    },

    /// A Kubernetes object lacks a field the conversion needs (`metadata.uid`, `spec`, …).
    #[error("object has no {what}")]
    MissingField {
        /// The field path.
        what: &'static str,
    },

    /// A value cannot be encoded into a HAMi wire format without becoming ambiguous or unreadable by
    /// HAMi (e.g. a UUID containing a `,`, `:` or `;` separator, a non-finite scaling factor, a number
    /// beyond HAMi's `int32`).
    #[error("cannot encode {what} {value:?}: {detail}")]
    Unencodable {
        /// What was being encoded (`uuid`, `type`, `memory_scaling`, …).
        what: &'static str,
        /// The offending value, rendered as text.
        value: String,
        /// Why it cannot be encoded.
        detail: &'static str,
    },
}

impl Error {
    /// A stable snake_case label for the kind of error, for metric labels and Kubernetes event reasons.
    /// The labels never change once published.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidQuantity { .. } => "invalid_quantity",
            Self::InvalidEnvValue { .. } => "invalid_env_value",
            Self::InvalidJson { .. } => "invalid_json",
            Self::InvalidNodeRegister { .. } => "invalid_node_register",
            Self::InvalidPodDevices { .. } => "invalid_pod_devices",
            Self::InvalidAnnotation { .. } => "invalid_annotation",
            Self::Unencodable { .. } => "unencodable",
            Self::InvalidResource { .. } => "invalid_resource",
            Self::MissingField { .. } => "missing_field",
        }
    }
}

/// `record 3, field devmem` / `record 3` / `value`.
fn location(what: &'static str, index: &Option<usize>, field: &Option<&'static str>) -> Location {
    Location {
        what,
        index: *index,
        field: *field,
    }
}

/// `container 1, device 0, field usedmem` and shorter forms.
fn pod_location(container: &usize, device: &Option<usize>, field: &Option<&'static str>) -> PodLocation {
    PodLocation {
        container: *container,
        device: *device,
        field: *field,
    }
}

/// ` (got "…")`, or nothing for an empty value.
fn shown(value: &str) -> Shown<'_> {
    Shown(value)
}

struct Location {
    what: &'static str,
    index: Option<usize>,
    field: Option<&'static str>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.index, self.field) {
            (Some(i), Some(field)) => write!(f, "{} {i}, field {field}", self.what),
            (Some(i), None) => write!(f, "{} {i}", self.what),
            (None, Some(field)) => write!(f, "field {field}"),
            (None, None) => f.write_str("value"),
        }
    }
}

struct PodLocation {
    container: usize,
    device: Option<usize>,
    field: Option<&'static str>,
}

impl fmt::Display for PodLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "container {}", self.container)?;
        if let Some(d) = self.device {
            write!(f, ", device {d}")?;
        }
        if let Some(field) = self.field {
            write!(f, ", field {field}")?;
        }
        Ok(())
    }
}

struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " (got {:?})", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_position_and_the_text() {
        let e = Error::InvalidNodeRegister {
            key: "hami.io/node-nvidia-register",
            record: Some(2),
            field: Some("devmem"),
            value: "abc".into(),
            detail: "expected a non-negative integer",
        };
        assert_eq!(
            e.to_string(),
            "annotation hami.io/node-nvidia-register: record 2, field devmem: expected a non-negative integer \
             (got \"abc\")"
        );
        assert_eq!(e.reason(), "invalid_node_register");

        let e = Error::InvalidPodDevices {
            container: 1,
            device: Some(0),
            field: Some("usedmem"),
            value: "-5".into(),
            detail: "expected a non-negative decimal integer",
        };
        assert_eq!(
            e.to_string(),
            "pod devices annotation: container 1, device 0, field usedmem: expected a non-negative decimal \
             integer (got \"-5\")"
        );
        let e = Error::InvalidQuantity {
            input: "4GB".into(),
            detail: "unknown suffix",
        };
        assert_eq!(e.to_string(), "invalid quantity \"4GB\": unknown suffix");
        assert_eq!(e.reason(), "invalid_quantity");
    }
}
