//! FibQuant vector quantizer (DESIGN §6). The implementation lands with the codec issue; the
//! crate exists now so the workspace has its final shape and dependency direction.
#![warn(missing_docs)]
