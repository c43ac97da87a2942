//! lmx-nn
