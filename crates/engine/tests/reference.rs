//! Oracle, weights as stored (Q4_1): candle quantizes activations to Q8_1 inside each matmul,
//! so any summation-order difference in attention (ours online softmax, theirs gemm) can flip an
//! 8-bit rounding. Measured: our own model with f32 vs f64 attention differs by 0.67 in a logit
//! on "The capital of France is" — the noise floor of this mode. So here we require the same
//! next token for every prompt and logits within that band; the strict 1e-3 comparison is
//! `reference_f32.rs`, with f32 weights on both sides.

mod common;

/// Asserts that `mode` agrees with candle on the stored weights within the band above: logits
/// within 1.0 and the same next token on every prompt; prints how long greedy stays the same.
fn agrees_with_candle_within_the_band(mode: pagedkv_engine::WeightMode) {
    for (i, c) in common::compare(mode, 16).iter().enumerate() {
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

#[test]
fn exact_weights_agree_within_activation_quantization_noise() {
    agrees_with_candle_within_the_band(pagedkv_engine::WeightMode::Exact);
}

/// Our Q4_1 kernel reads the same stored weights, and rounds activations to 8 bits per 32
/// inputs as candle does (with an f32 scale and an exact code sum where candle keeps f16), so
/// it is held to the same band as `exact`.
#[test]
fn q4_kernel_agrees_with_candle_on_the_stored_weights() {
    agrees_with_candle_within_the_band(pagedkv_engine::WeightMode::Q4);
}
