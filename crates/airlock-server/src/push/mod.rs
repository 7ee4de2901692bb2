//! Pushing instructions to appliances.

pub mod index;
