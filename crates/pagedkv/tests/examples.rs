//! The examples run as part of the test suite, so they keep compiling and working.

#[path = "../examples/embed.rs"]
mod embed;

#[test]
fn the_embedding_example_runs() {
    embed::main().unwrap();
}
