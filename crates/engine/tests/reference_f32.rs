//! Oracle, strict: both models with the weights dequantized to f32 (candle's
//! `CANDLE_DEQUANTIZE_ALL`), so no activation quantization inside the matmuls can turn rounding
//! differences into jumps. With the f32 cache codec the logits agree within 1e-3 and 64 greedy
//! tokens are identical. Own test binary: the variable is process-wide.

mod common;

#[test]
fn f32_weights_logits_within_1e3_and_greedy_identical() {
    // SAFETY-free: this binary has a single test, so no other thread reads the environment now.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    for (i, c) in common::compare(pagedkv_engine::WeightMode::F32, 64)
        .iter()
        .enumerate()
    {
        assert!(
            c.max_diff <= 1e-3,
            "prompt {i}: max |Δlogit| {}",
            c.max_diff
        );
        assert_eq!(c.ours, c.theirs, "prompt {i}: greedy continuations differ");
    }
}
