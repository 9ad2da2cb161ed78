//! Incremental refresh of the view tables after a run.
