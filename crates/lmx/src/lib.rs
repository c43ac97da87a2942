//! lmx
