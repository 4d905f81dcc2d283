//! Placement benchmark (filled in below).
fn main() {}
