//! # Layout
//!
//! The persisted event contracts of Orderly: one payload type per event and schema version, the
//! metadata envelope every event carries, stable type names, upcasters from old versions to the
//! current ones, and the JSON Schema files under `schemas/` generated from these types.
