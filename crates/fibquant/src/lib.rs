//! FibQuant vector quantization (DESIGN §6, after Lee & Kim 2026): a vector x ∈ R^d is stored
//! as its norm ν (f16) and, for u = Π·x/ν (Π a seeded randomized Hadamard rotation), the index of
//! the nearest codeword of each block of k coordinates (to within a fixed-point rounding up to
//! 4,096 codewords, [`fixed_scan`]), bit-packed at ⌈log2 N⌉ bits.
//!
//! ```text
//!  code = [ν: f16 little-endian][indices: d/k × ⌈log2 N⌉ bits, packed LSB first]
//!  rate = ⌈log2 N⌉/k + 16/d bits per coordinate
//! ```
//!
//! Usable on its own: nothing here knows about KV blocks.
#![warn(missing_docs)]

pub mod codebook;
pub mod fixed_scan;
pub mod pack;
pub mod payload;
pub mod rotation;
pub mod scan;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use half::f16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use codebook::Codebook;
pub use rotation::{HadamardRotation, Isa, Rotation, RotationKind};

/// ‖x‖ in f64, summed in eight interleaved partial sums (which vectorize; one running sum
/// waited on each addition, a quarter of a page's encoding time).
fn norm_f64(x: &[f32]) -> f64 {
    let mut partial = [0f64; 8];
    let (whole, rest) = x.split_at(x.len() / 8 * 8);
    for chunk in whole.chunks_exact(8) {
        for (p, v) in partial.iter_mut().zip(chunk) {
            *p += f64::from(*v) * f64::from(*v);
        }
    }
    let tail: f64 = rest.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
    (partial.iter().sum::<f64>() + tail).sqrt()
}

/// Bits of one codeword index: ⌈log2 N⌉ (N ≥ 2).
pub fn index_bits(n: usize) -> u32 {
    usize::BITS - (n - 1).leading_zeros()
}

/// Bytes of one encoded vector of dimension `d` in blocks of `k` with `n` codewords: the f16
/// norm plus the packed indices. The single source of this size (the KV cache's page sizes use it).
pub fn code_bytes(d: usize, k: usize, n: usize) -> usize {
    2 + pack::packed_len(d / k, index_bits(n))
}

/// What defines a quantizer; codebook and rotation depend on nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Profile {
    /// Vector dimension (a power of two, for the fast rotation).
    pub d: usize,
    /// Coordinates per codeword (divides d).
    pub k: usize,
    /// Codewords, 2 ..= 65,536.
    pub n: usize,
    /// Seed of the rotation and of the refinement samples.
    pub seed: u64,
    /// The rotation (randomized Hadamard unless chosen otherwise).
    pub rotation: RotationKind,
}

impl Profile {
    /// A profile with the default (Hadamard) rotation.
    pub fn new(d: usize, k: usize, n: usize, seed: u64) -> Self {
        Self {
            d,
            k,
            n,
            seed,
            rotation: RotationKind::Hadamard,
        }
    }

    /// The same profile with another rotation.
    pub fn with_rotation(self, rotation: RotationKind) -> Self {
        Self { rotation, ..self }
    }
}

/// Errors of the crate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FibQuantError {
    /// The profile cannot be built.
    #[error("invalid FibQuant profile {profile:?}: {reason}")]
    InvalidProfile {
        /// The profile.
        profile: Profile,
        /// Why.
        reason: &'static str,
    },
    /// A slice has the wrong length.
    #[error("{what}: expected {expected} elements, got {got}")]
    ShapeMismatch {
        /// What was passed.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// The input holds NaN or infinity.
    #[error("non-finite value in the vector to encode")]
    NonFinite,
    /// The vector's norm does not fit f16.
    #[error("vector norm {norm} exceeds the f16 range")]
    NormOutOfRange {
        /// The norm.
        norm: f32,
    },
    /// A code holds an index outside the codebook.
    #[error("codeword index {index} out of range for {n} codewords")]
    BadIndex {
        /// The index.
        index: usize,
        /// Codebook size.
        n: usize,
    },
}

/// A FibQuant quantizer for one profile.
#[derive(Debug, Clone)]
pub struct FibQuant {
    profile: Profile,
    rotation: Rotation,
    codebook: Codebook,
    bits: u32,
}

impl FibQuant {
    /// Builds rotation and codebook (Lloyd–Max refinement included; deterministic in the seed).
    pub fn new(profile: Profile) -> Result<Self, FibQuantError> {
        validate(profile)?;
        let mut rng = ChaCha8Rng::seed_from_u64(profile.seed);
        let rotation = Rotation::new(profile.rotation, profile.d, &mut rng);
        let codebook = Codebook::build(profile.d, profile.k, profile.n, profile.seed);
        let bits = index_bits(profile.n);
        Ok(Self {
            profile,
            rotation,
            codebook,
            bits,
        })
    }

    /// A quantizer of `profile` with a codebook built before (e.g. read back with
    /// [`payload::codebook_from_bytes`]), skipping the refinement.
    pub fn with_codebook(profile: Profile, codebook: Codebook) -> Result<Self, FibQuantError> {
        validate(profile)?;
        if codebook.k() != profile.k || codebook.len() != profile.n {
            return Err(FibQuantError::InvalidProfile {
                profile,
                reason: "the codebook's k or N differs from the profile's",
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(profile.seed);
        Ok(Self {
            profile,
            rotation: Rotation::new(profile.rotation, profile.d, &mut rng),
            codebook,
            bits: index_bits(profile.n),
        })
    }

    /// The quantizer of `profile`, built once per process and shared: building refines the
    /// codebook (a quarter of a second for N = 256 on two cores, half a minute for 4,096),
    /// encoding and decoding only read it. With [`keep_codebooks_in`] set, the codebook is
    /// read from there when an earlier process built it ([`Self::read_or_build`]).
    pub fn shared(profile: Profile) -> Result<Arc<Self>, FibQuantError> {
        static CACHE: OnceLock<Mutex<HashMap<Profile, Arc<FibQuant>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(q) = cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&profile)
        {
            return Ok(q.clone());
        }
        // built outside the lock; two threads racing build the same deterministic quantizer
        let dir = CODEBOOK_DIR.get().map(PathBuf::as_path);
        let built = Arc::new(Self::read_or_build(profile, dir)?);
        let mut guard = cache.lock().unwrap_or_else(|e| e.into_inner());
        Ok(guard.entry(profile).or_insert(built).clone())
    }

    /// The quantizer of `profile`, its codebook read from `dir` when an earlier process left
    /// it there, else built (refined) and written there for the next one. The cache only
    /// saves time: a file that is missing, unreadable, corrupt (its checksum) or of another
    /// shape is rebuilt and replaced, and a directory that cannot be written costs only the
    /// rebuild next time.
    pub fn read_or_build(profile: Profile, dir: Option<&Path>) -> Result<Self, FibQuantError> {
        validate(profile)?;
        let Some(dir) = dir else {
            return Self::new(profile);
        };
        let path = dir.join(codebook_file(profile));
        if let Some(codebook) = read_codebook(&path, profile) {
            return Self::with_codebook(profile, codebook);
        }
        let built = Self::new(profile)?;
        // not kept: the next process builds it again
        let _unwritable = write_codebook(&path, &built.codebook);
        Ok(built)
    }

    /// The profile.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// The codebook.
    pub fn codebook(&self) -> &Codebook {
        &self.codebook
    }

    /// Index bits per block of k coordinates.
    pub fn index_bits(&self) -> u32 {
        self.bits
    }

    /// Rotates `x` (length d) into the quantizer's basis: queries are rotated once, then
    /// scored against codewords directly (asymmetric distance, DESIGN §6).
    pub fn rotate(&self, x: &mut [f32]) {
        self.rotation.apply(x);
    }

    /// [`Self::rotate`] with the instructions `isa` allows (the same result on every one).
    pub fn rotate_with(&self, x: &mut [f32], isa: Isa) {
        self.rotation.apply_with(x, isa);
    }

    /// Rotates `x` back from the quantizer's basis and multiplies by `scale`.
    pub fn unrotate_scaled(&self, x: &mut [f32], scale: f32) {
        self.rotation.inverse_scaled(x, scale);
    }

    /// [`Self::unrotate_scaled`] with the instructions `isa` allows.
    pub fn unrotate_scaled_with(&self, x: &mut [f32], scale: f32, isa: Isa) {
        self.rotation.inverse_scaled_with(x, scale, isa);
    }

    /// Bytes of one encoded vector.
    pub fn code_bytes(&self) -> usize {
        code_bytes(self.profile.d, self.profile.k, self.profile.n)
    }

    /// Bits per coordinate, norm included.
    pub fn rate(&self) -> f64 {
        self.bits as f64 / self.profile.k as f64 + 16.0 / self.profile.d as f64
    }

    /// Encodes `x` (length d) into `out` (`code_bytes` long).
    pub fn encode(&self, x: &[f32], out: &mut [u8]) -> Result<(), FibQuantError> {
        self.encode_rows(x, out)
    }

    /// Encodes consecutive vectors (`rows`: a multiple of d) into consecutive codes (`out`:
    /// as many times `code_bytes`): every vector normalized and rotated, then the nearest
    /// codewords of all their blocks searched together. On error `out` may be partly written.
    pub fn encode_rows(&self, rows: &[f32], out: &mut [u8]) -> Result<(), FibQuantError> {
        let (d, k) = (self.profile.d, self.profile.k);
        let count = rows.len() / d;
        check_len("vectors", count * d, rows.len())?;
        check_len("codes", count * self.code_bytes(), out.len())?;
        let mut rotated = rows.to_vec();
        for (u, code) in rotated
            .chunks_exact_mut(d)
            .zip(out.chunks_exact_mut(self.code_bytes()))
        {
            // a sum of squares in f64 is finite exactly when every f32 term is
            let norm = norm_f64(u);
            if !norm.is_finite() {
                return Err(FibQuantError::NonFinite);
            }
            let norm = norm as f32;
            if norm > f16::MAX.to_f32() {
                return Err(FibQuantError::NormOutOfRange { norm });
            }
            code[..2].copy_from_slice(&f16::from_f32(norm).to_le_bytes());
            // below the smallest normal f32, 1/norm is infinite (and the f16 norm is 0)
            if norm >= f32::MIN_POSITIVE {
                self.rotation.apply_scaled(u, 1.0 / norm);
            } else {
                u.fill(0.0);
            }
        }
        let mut indices = vec![0u16; count * (d / k)];
        self.codebook.nearest_blocks(&rotated, &mut indices);
        for (indices, code) in indices
            .chunks_exact(d / k)
            .zip(out.chunks_exact_mut(self.code_bytes()))
        {
            pack::pack(indices, self.bits, &mut code[2..]);
        }
        Ok(())
    }

    /// Decodes a code into `out` (length d): gather codewords, inverse rotation, scale by ν.
    pub fn decode(&self, code: &[u8], out: &mut [f32]) -> Result<(), FibQuantError> {
        self.decode_rows(code, out)
    }

    /// Decodes consecutive codes into consecutive vectors (the inverse of
    /// [`encode_rows`](Self::encode_rows)).
    pub fn decode_rows(&self, codes: &[u8], out: &mut [f32]) -> Result<(), FibQuantError> {
        let (d, k) = (self.profile.d, self.profile.k);
        let count = out.len() / d;
        check_len("output", count * d, out.len())?;
        check_len("codes", count * self.code_bytes(), codes.len())?;
        let mut indices = vec![0u16; d / k];
        for (code, row) in codes
            .chunks_exact(self.code_bytes())
            .zip(out.chunks_exact_mut(d))
        {
            let norm = f16::from_le_bytes([code[0], code[1]]).to_f32();
            pack::unpack(&code[2..], self.bits, &mut indices);
            for (block, idx) in row.chunks_exact_mut(k).zip(&indices) {
                let index = *idx as usize;
                if index >= self.profile.n {
                    return Err(FibQuantError::BadIndex {
                        index,
                        n: self.profile.n,
                    });
                }
                block.copy_from_slice(self.codebook.word(index));
            }
            self.rotation.inverse_scaled(row, norm);
        }
        Ok(())
    }
}

/// Where [`FibQuant::shared`] keeps built codebooks between processes, once set.
static CODEBOOK_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Bumped whenever [`Codebook::build`] would give other codewords for a profile, so that files
/// of an older build are not read.
const CODEBOOK_BUILD: u32 = 1;

/// Makes [`FibQuant::shared`] keep the codebooks it builds in `dir` (created when needed) and
/// read them back in later processes: refining N = 4096 codewords takes about half a minute on
/// two cores, reading the file milliseconds. Set once per process, before the first quantizer
/// is built; returns false (and changes nothing) if it was set before.
pub fn keep_codebooks_in(dir: PathBuf) -> bool {
    CODEBOOK_DIR.set(dir).is_ok()
}

/// The file name of a profile's codebook: everything it depends on (the rotation does not
/// enter the codebook).
fn codebook_file(profile: Profile) -> String {
    let Profile { d, k, n, seed, .. } = profile;
    let format = payload::VERSION;
    format!("fibquant-build{CODEBOOK_BUILD}-format{format}-d{d}-k{k}-n{n}-seed{seed:016x}.codebook")
}

/// The codebook stored at `path` if it is there, intact and of the profile's shape. Every
/// failure here means the same (no stored codebook to use: the caller builds one): a missing
/// file (the first run), an unreadable one, a checksum or shape that does not match.
fn read_codebook(path: &Path, profile: Profile) -> Option<Codebook> {
    let bytes = std::fs::read(path).ok()?;
    payload::codebook_from_bytes(&bytes)
        .ok()
        .filter(|codebook| codebook.k() == profile.k && codebook.len() == profile.n)
}

/// Writes a codebook to `path` by a rename, so that a reader never sees half a file.
fn write_codebook(path: &Path, codebook: &Codebook) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // one partial file per process and thread, removed if it cannot be put in place
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = path.with_extension(format!("partial-{}-{write}", std::process::id()));
    let written = std::fs::write(&partial, payload::codebook_to_bytes(codebook))
        .and_then(|()| std::fs::rename(&partial, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// Checks that a profile can be built.
fn validate(profile: Profile) -> Result<(), FibQuantError> {
    let invalid = |reason| Err(FibQuantError::InvalidProfile { profile, reason });
    match profile.rotation {
        RotationKind::Hadamard
            if profile.d == 0 || !profile.d.is_power_of_two() || profile.d > 1 << 16 =>
        {
            return invalid("d must be a power of two up to 65,536 (Hadamard rotation)");
        }
        RotationKind::Haar if profile.d == 0 || profile.d > 4096 => {
            return invalid("d must be 1..=4096 (dense Haar rotation)");
        }
        _ => {}
    }
    if profile.k == 0 || profile.k > 8 || !profile.d.is_multiple_of(profile.k) {
        return invalid("k must be 1..=8 and divide d");
    }
    if !(2..=65_536).contains(&profile.n) {
        return invalid("N must be 2..=65,536");
    }
    Ok(())
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), FibQuantError> {
    if expected != got {
        return Err(FibQuantError::ShapeMismatch {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_cosine(q: &FibQuant, vectors: usize) -> f64 {
        let d = q.profile().d;
        let mut rng = ChaCha8Rng::seed_from_u64(12345);
        let mut code = vec![0u8; q.code_bytes()];
        let mut back = vec![0f32; d];
        let mut total = 0.0;
        for _ in 0..vectors {
            let x: Vec<f32> = (0..d).map(|_| codebook::normal(&mut rng) as f32).collect();
            q.encode(&x, &mut code).unwrap();
            q.decode(&code, &mut back).unwrap();
            let dot: f64 = x
                .iter()
                .zip(&back)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            let nx = x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            let nb = back.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            total += dot / (nx * nb);
        }
        total / vectors as f64
    }

    /// Floors: what the `fib-quant` crate reaches at d = 128 on Gaussian vectors.
    #[test]
    fn quality_at_d128_meets_the_fib_quant_crate() {
        for (k, n, floor) in [
            (2, 16, 0.94),
            (2, 64, 0.984),
            (2, 256, 0.996),
            (4, 256, 0.948),
        ] {
            let q = FibQuant::new(Profile::new(128, k, n, 1)).unwrap();
            let cos = mean_cosine(&q, 500);
            let q64 = FibQuant::new(Profile::new(64, k, n, 1)).unwrap();
            println!(
                "k{k}N{n}: d=128 mean cosine {cos:.5} (floor {floor}); d=64 {:.5}; rate {:.3} bits",
                mean_cosine(&q64, 500),
                q.rate()
            );
            assert!(cos >= floor, "k{k}N{n}: mean cosine {cos} < {floor}");
        }
    }

    #[test]
    fn dense_haar_rotation_is_an_option_of_equal_quality() {
        // the codebook does not depend on the rotation: both make the blocks follow one law
        let hadamard = FibQuant::new(Profile::new(64, 2, 64, 1)).unwrap();
        let haar =
            FibQuant::new(Profile::new(64, 2, 64, 1).with_rotation(RotationKind::Haar)).unwrap();
        let (a, b) = (mean_cosine(&hadamard, 300), mean_cosine(&haar, 300));
        assert!((a - b).abs() < 0.003, "Hadamard {a} vs Haar {b}");
        // Haar needs no power of two
        let odd =
            FibQuant::new(Profile::new(48, 2, 64, 1).with_rotation(RotationKind::Haar)).unwrap();
        assert!(mean_cosine(&odd, 100) > 0.98);
        assert!(FibQuant::new(Profile::new(48, 2, 64, 1)).is_err());
    }

    #[test]
    fn codebooks_serialize_and_reject_corruption() {
        let q = FibQuant::new(Profile::new(64, 2, 16, 9)).unwrap();
        let bytes = payload::codebook_to_bytes(q.codebook());
        let back = payload::codebook_from_bytes(&bytes).unwrap();
        assert_eq!(&back, q.codebook());
        let again = FibQuant::with_codebook(q.profile(), back).unwrap();
        assert_eq!(again.codebook_digest(), q.codebook_digest());
        let x: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
        let (mut a, mut b) = (vec![0u8; q.code_bytes()], vec![0u8; q.code_bytes()]);
        q.encode(&x, &mut a).unwrap();
        again.encode(&x, &mut b).unwrap();
        assert_eq!(a, b);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(payload::codebook_from_bytes(&bad).is_err(), "byte {i}");
        }
        for len in 0..bytes.len() {
            assert!(payload::codebook_from_bytes(&bytes[..len]).is_err());
        }
        assert!(FibQuant::with_codebook(Profile::new(64, 2, 32, 9), q.codebook().clone()).is_err());
    }

    /// The first build writes the codebook, the second reads it back (the same codewords);
    /// a corrupted file is rebuilt and replaced; an unwritable directory still builds.
    #[test]
    fn codebooks_kept_on_disk_are_read_back_and_corrupt_ones_rebuilt() {
        let dir = std::env::temp_dir().join(format!("fibquant-codebooks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let profile = Profile::new(64, 2, 16, 11);
        let path = dir.join(codebook_file(profile));
        let built = FibQuant::read_or_build(profile, Some(dir.as_path())).unwrap();
        let written = std::fs::read(&path).expect("the codebook was written");
        let read = FibQuant::read_or_build(profile, Some(dir.as_path())).unwrap();
        assert_eq!(read.codebook(), built.codebook());
        assert_eq!(read.codebook(), FibQuant::new(profile).unwrap().codebook());
        // a flipped byte fails the checksum: rebuilt, and the file restored
        let mut corrupt = written.clone();
        corrupt[20] ^= 0x40;
        std::fs::write(&path, &corrupt).unwrap();
        let rebuilt = FibQuant::read_or_build(profile, Some(dir.as_path())).unwrap();
        assert_eq!(rebuilt.codebook(), built.codebook());
        assert_eq!(std::fs::read(&path).unwrap(), written);
        // another profile's file under this name (N differs): not used
        let other = FibQuant::new(Profile::new(64, 2, 32, 11)).unwrap();
        std::fs::write(&path, payload::codebook_to_bytes(other.codebook())).unwrap();
        let again = FibQuant::read_or_build(profile, Some(dir.as_path())).unwrap();
        assert_eq!(again.codebook(), built.codebook());
        // a directory that is a file: nothing written, the quantizer still built
        let blocked = dir.join("a-file");
        std::fs::write(&blocked, b"x").unwrap();
        let unkept = FibQuant::read_or_build(profile, Some(blocked.as_path())).unwrap();
        assert_eq!(unkept.codebook(), built.codebook());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Pins a small profile's codebook: a change to [`Codebook::build`] that moves codewords
    /// must come with a new `CODEBOOK_BUILD`, or processes would read back codebooks of the
    /// older build from disk (and pages encoded with them would decode wrongly).
    #[test]
    fn a_codebook_build_that_changes_codewords_changes_its_number() {
        let q = FibQuant::new(Profile::new(64, 4, 64, 7)).unwrap();
        let digest = q.codebook_digest();
        println!("build {CODEBOOK_BUILD}, digest {digest:#018x}");
        assert_eq!(
            (CODEBOOK_BUILD, digest),
            (1, 0x65e5_a6a8_9164_5b52),
            "bump CODEBOOK_BUILD and this pin"
        );
    }

    #[test]
    fn bad_profiles_and_inputs_are_errors() {
        let bad = [
            (96, 2, 16),
            (128, 3, 16),
            (128, 2, 1),
            (128, 2, 70_000),
            (128, 0, 16),
        ];
        for (d, k, n) in bad {
            assert!(
                FibQuant::new(Profile::new(d, k, n, 0)).is_err(),
                "{d} {k} {n}"
            );
        }
        let q = FibQuant::new(Profile::new(64, 2, 16, 0)).unwrap();
        let mut code = vec![0u8; q.code_bytes()];
        assert_eq!(
            q.encode(&[f32::NAN; 64], &mut code),
            Err(FibQuantError::NonFinite)
        );
        assert!(matches!(
            q.encode(&[0.0; 63], &mut code),
            Err(FibQuantError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            q.encode(&[1e5; 64], &mut code),
            Err(FibQuantError::NormOutOfRange { .. })
        ));
        q.encode(&[0.0; 64], &mut code).unwrap();
        let mut out = vec![1f32; 64];
        q.decode(&code, &mut out).unwrap();
        assert!(out.iter().all(|v| *v == 0.0));
    }
}
