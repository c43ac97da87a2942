//! lmx-generate
