//! lmx-models
