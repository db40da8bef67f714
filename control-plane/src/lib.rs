//! Phoenix control plane.
