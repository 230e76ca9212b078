//! `codecs` benchmark (issue: codecs): page encode and decode per codec at d = 64 and 128, with
//! the `fib-quant` 0.1.0-beta.4 crate measured in the same run for k2N256 and k4N256 (16 vectors
//! per iteration on both sides, i.e. one page; its batch calls `encode_batch` and
//! `decode_batch_fast`, the fastest it has). Relative MSE of both FibQuant implementations on
//! 512 Gaussian vectors is printed first, since a speed claim holds only at equal or lower
//! error.
//!
//! Run: `cargo bench -p pagedkv --bench codecs`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fib_quant::{FibQuantProfileV1, FibQuantizer};
use pagedkv::codec::scalar::{decode_page, encode_page};
use pagedkv::codec::synthetic::gaussian;
use pagedkv::{Codec, Role};

const BS: usize = 16;

fn codecs() -> Vec<Codec> {
    let mut all = Codec::FIXED.to_vec();
    all.push(Codec::FibQuant { k: 2, n: 256 });
    all.push(Codec::FibQuant { k: 4, n: 256 });
    all
}

fn relative_mse(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    err / x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>()
}

fn bench(c: &mut Criterion) {
    for d in [64usize, 128] {
        let rows = gaussian(BS * d, d as u64);
        let mut group = c.benchmark_group(format!("codec_d{d}"));
        group.throughput(Throughput::Elements(BS as u64));
        for codec in codecs() {
            let bytes = codec.page_bytes(Role::Key, BS, d).unwrap();
            let mut page = vec![0u8; bytes];
            let mut back = vec![0f32; BS * d];
            encode_page(codec, Role::Key, &rows, BS, d, &mut page).unwrap();
            decode_page(codec, Role::Key, &page, BS, d, &mut back).unwrap();
            if let Codec::FibQuant { k, n } = codec {
                // the baseline on the same vectors
                let profile =
                    FibQuantProfileV1::paper_default(d, k as usize, n as usize, 1).unwrap();
                let theirs = FibQuantizer::new(profile).unwrap();
                let codes: Vec<_> = rows
                    .chunks_exact(d)
                    .map(|v| theirs.encode(v).unwrap())
                    .collect();
                // error over 512 vectors (32 pages): one page is too small a sample
                let many = gaussian(32 * BS * d, 1000 + d as u64);
                let mut ours_back = vec![0f32; many.len()];
                for (src, dst) in many
                    .chunks_exact(BS * d)
                    .zip(ours_back.chunks_exact_mut(BS * d))
                {
                    encode_page(codec, Role::Key, src, BS, d, &mut page).unwrap();
                    decode_page(codec, Role::Key, &page, BS, d, dst).unwrap();
                }
                let theirs_back: Vec<f32> = many
                    .chunks_exact(d)
                    .flat_map(|v| theirs.decode(&theirs.encode(v).unwrap()).unwrap())
                    .collect();
                eprintln!(
                    "d={d} {codec}: relative MSE over 512 Gaussian vectors: ours {:.4e}, fib-quant {:.4e}",
                    relative_mse(&many, &ours_back),
                    relative_mse(&many, &theirs_back)
                );
                let vectors: Vec<&[f32]> = rows.chunks_exact(d).collect();
                group.bench_function(format!("{codec}/encode/fib-quant-0.1.0-beta.4"), |b| {
                    b.iter(|| black_box(theirs.encode_batch(black_box(&vectors)).unwrap()))
                });
                group.bench_function(format!("{codec}/decode/fib-quant-0.1.0-beta.4"), |b| {
                    b.iter(|| black_box(theirs.decode_batch_fast(black_box(&codes)).unwrap()))
                });
            }
            group.bench_function(format!("{codec}/encode"), |b| {
                b.iter(|| {
                    encode_page(codec, Role::Key, black_box(&rows), BS, d, &mut page).unwrap()
                })
            });
            group.bench_function(format!("{codec}/decode"), |b| {
                b.iter(|| {
                    decode_page(codec, Role::Key, black_box(&page), BS, d, &mut back).unwrap()
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
