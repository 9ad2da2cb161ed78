//! Views as tables in schema `sof`.
