//! Calibration: fitting what a cache layout carries from a model's own keys and queries (key
//! means for `+keynorm`, split plans for `+keysplit`). Run once, offline, by `eval` and
//! `calibrate`; serving only applies the results ([`crate::KeyNorm`], [`crate::KeySplit`]).

pub mod key_norm_fit;
pub mod key_split_fit;

pub use key_norm_fit::KeyNormFit;
