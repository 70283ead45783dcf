//! The `weir` binary: the reference service, the demo, publishing and benchmarks.

fn main() {
    println!("weir");
}
