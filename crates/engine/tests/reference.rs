//! Oracle, weights as stored (Q4_1): candle quantizes activations to Q8_1 inside each matmul,
//! so any summation-order difference in attention (ours online softmax, theirs gemm) can flip an
//! 8-bit rounding. Measured: our own model with f32 vs f64 attention differs by 0.67 in a logit
//! on "The capital of France is" — the noise floor of this mode. So here we require the same
//! next token for every prompt and logits within that band; the strict 1e-3 comparison is
//! `reference_f32.rs`, with f32 weights on both sides.

mod common;

#[test]
fn exact_weights_agree_within_activation_quantization_noise() {
    for (i, c) in common::compare(pagedkv_engine::WeightMode::Exact, 16)
        .iter()
        .enumerate()
    {
        assert!(c.max_diff <= 1.0, "prompt {i}: max |Δlogit| {}", c.max_diff);
        assert_eq!(c.ours[0], c.theirs[0], "prompt {i}: next token differs");
        let common_prefix = c
            .ours
            .iter()
            .zip(&c.theirs)
            .take_while(|(a, b)| a == b)
            .count();
        println!("prompt {i}: greedy tokens identical for {common_prefix} of 16");
    }
}

/// Our Q4_1 kernel reads the same stored weights, and rounds activations to 8 bits per 32
/// inputs as candle does (with an f32 scale and an exact code sum where candle keeps f16), so
/// it is held to the same band as `exact`.
#[test]
fn q4_kernel_agrees_with_candle_on_the_stored_weights() {
    for (i, c) in common::compare(pagedkv_engine::WeightMode::Q4, 16)
        .iter()
        .enumerate()
    {
        assert!(c.max_diff <= 1.0, "prompt {i}: max |Δlogit| {}", c.max_diff);
        assert_eq!(c.ours[0], c.theirs[0], "prompt {i}: next token differs");
        let common_prefix = c
            .ours
            .iter()
            .zip(&c.theirs)
            .take_while(|(a, b)| a == b)
            .count();
        println!(
            "prompt {i}: max |Δlogit| {:.2}, greedy tokens identical for {common_prefix} of 16",
            c.max_diff
        );
    }
}
