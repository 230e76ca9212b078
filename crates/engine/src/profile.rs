//! KV profiles: a calibrated cache setting made once (`pagedkv calibrate`) and used everywhere.
//!
//! A profile holds what `eval` used to fit on every run: the setting (codecs per layer and
//! role, sink tokens, key normalization and split), the key means of [`pagedkv::KeyNorm`] and
//! the channel plans of [`pagedkv::KeySplit`]. It is bound to one model file by its
//! fingerprint, and its JSON carries a format version and a checksum of its content, so a
//! damaged or foreign profile is refused, never half-applied. The layout a profile builds
//! carries the means' and plans' digests, so blocks, tier payloads and shared-tier keys of two
//! profiles never mix.

use std::path::Path;

use pagedkv::{BlockHash, Codec, KeyNorm, KeySplit, KvLayout, LayoutSpec, SplitPlan};
use serde_json::{json, Value};

use crate::config::{ModelConfig, RopeScaling, RopeStyle};
use crate::error::{EngineError, Result};
use crate::eval::CodecPair;
use crate::fingerprint::ModelFingerprint;

/// The `format` field of every profile.
const FORMAT: &str = "pagedkv-kv-profile";
/// The version this build reads and writes.
const VERSION: u64 = 1;

/// How a profile was made (for people; not part of what it applies).
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    /// The calibration text.
    pub text: String,
    /// Windows of the text the per-layer sensitivity was measured on.
    pub windows: usize,
    /// Windows skipped before them.
    pub skip_windows: usize,
    /// Tokens per window.
    pub window: usize,
    /// The bit budget the assignment was made for.
    pub budget_bits: f64,
    /// The assignment's stored bits per element over a window.
    pub bits_per_element: f64,
}

/// A calibrated cache setting for one model.
#[derive(Debug, Clone)]
pub struct KvProfile {
    /// The model file the profile was made on.
    pub model: ModelFingerprint,
    /// Layers, kv heads and head_dim of that model.
    pub geometry: (usize, usize, usize),
    /// The RoPE base the key means are rotated with.
    pub rope_base: f32,
    /// The setting: codecs per layer and role, sinks, recent window, key normalization/split.
    pub setting: CodecPair,
    /// Pre-RoPE key means, `layers × kv_heads × head_dim` (with `+keynorm` or `+keysplit`).
    pub key_means: Option<Vec<f32>>,
    /// Per layer, the key split plan (with `+keysplit`).
    pub key_split: Option<Vec<Option<SplitPlan>>>,
    /// How it was made.
    pub provenance: Provenance,
}

impl PartialEq for KvProfile {
    /// Equal content, as the checksum sees it.
    fn eq(&self, other: &Self) -> bool {
        self.content() == other.content()
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::BadProfile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Exact in JSON: an f32 written as the f64 it widens to reads back bit for bit.
fn floats(values: &[f32]) -> Value {
    Value::from(values.iter().map(|x| f64::from(*x)).collect::<Vec<_>>())
}

impl KvProfile {
    /// The layout of this profile for `config`'s model with blocks of `block_size`.
    pub fn layout(&self, config: &ModelConfig, block_size: usize) -> Result<KvLayout> {
        let geometry = (config.layers, config.kv_heads, config.head_dim);
        if geometry != self.geometry {
            return Err(EngineError::InvalidArgument(format!(
                "the profile is for {:?} (layers, kv heads, head_dim); the model has {geometry:?}",
                self.geometry
            )));
        }
        let s = &self.setting;
        let base = config.kv_layout_with(s.key, s.value, block_size, s.layer_overrides.clone())?;
        let key_norm = self.key_norm(config, block_size)?.map(std::sync::Arc::new);
        let key_split = self.key_split(config)?.map(std::sync::Arc::new);
        Ok(KvLayout::new(LayoutSpec {
            sink_tokens: s.sinks,
            recent_tokens: s.recent,
            key_norm,
            key_split,
            ..base.spec().clone()
        })?)
    }

    /// The key normalization of the profile's means for blocks of `block_size`.
    pub fn key_norm(&self, config: &ModelConfig, block_size: usize) -> Result<Option<KeyNorm>> {
        self.key_means
            .as_ref()
            .map(|means| {
                key_norm_supported(config)?;
                Ok(KeyNorm::new(
                    config.layers,
                    config.kv_heads,
                    config.head_dim,
                    block_size,
                    self.rope_base,
                    means.clone(),
                )?)
            })
            .transpose()
    }

    /// The profile's key split plans.
    pub fn key_split(&self, config: &ModelConfig) -> Result<Option<KeySplit>> {
        self.key_split
            .as_ref()
            .map(|plans| {
                Ok(KeySplit::new(
                    config.kv_heads,
                    config.head_dim,
                    plans.clone(),
                )?)
            })
            .transpose()
    }

    /// Checks that the profile was made on `model` (by the file's fingerprint).
    pub fn check_model(&self, path: &Path, model: ModelFingerprint) -> Result<()> {
        if self.model != model {
            return Err(bad(
                path,
                format!(
                    "it was made for model {}; this model is {}",
                    self.model.hex(),
                    model.hex()
                ),
            ));
        }
        Ok(())
    }

    /// The content every field contributes to, as canonical bytes (the checksum's input): each
    /// part tagged and its length first, so no two contents share their bytes.
    fn content(&self) -> Vec<u8> {
        let (layers, kv_heads, head_dim) = self.geometry;
        let p = &self.provenance;
        let mut bytes = Vec::new();
        let mut put = |tag: &str, part: &[u8]| {
            bytes.extend_from_slice(tag.as_bytes());
            bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
            bytes.extend_from_slice(part);
        };
        put("format", format!("{FORMAT};v{VERSION}").as_bytes());
        put("model", self.model.hex().as_bytes());
        put(
            "geometry",
            format!(
                "{layers};{kv_heads};{head_dim};{}",
                self.rope_base.to_bits()
            )
            .as_bytes(),
        );
        put("setting", self.setting.to_string().as_bytes());
        put("text", p.text.as_bytes());
        put(
            "calibration",
            format!(
                "{};{};{};{};{}",
                p.windows,
                p.skip_windows,
                p.window,
                p.budget_bits.to_bits(),
                p.bits_per_element.to_bits()
            )
            .as_bytes(),
        );
        if let Some(means) = &self.key_means {
            let means: Vec<u8> = means.iter().flat_map(|x| x.to_le_bytes()).collect();
            put("means", &means);
        }
        if let Some(plans) = &self.key_split {
            put("split", &(plans.len() as u64).to_le_bytes());
            for (layer, plan) in plans.iter().enumerate() {
                let Some(plan) = plan else { continue };
                put("plan", format!("{layer};{}", plan.for_codec()).as_bytes());
                for chunk in plan.chunks() {
                    put(
                        "chunk",
                        chunk.map_or("-".into(), |c| c.to_string()).as_bytes(),
                    );
                }
                let order: Vec<u8> = plan.order().iter().flat_map(|o| o.to_le_bytes()).collect();
                put("order", &order);
                let scale: Vec<u8> = plan.scale().iter().flat_map(|s| s.to_le_bytes()).collect();
                put("scale", &scale);
            }
        }
        bytes
    }

    /// The checksum written into and checked against the file.
    pub fn checksum(&self) -> String {
        format!("{:032x}", BlockHash::of_bytes(&self.content()).0)
    }

    /// The profile as JSON.
    pub fn to_json(&self) -> String {
        let (layers, kv_heads, head_dim) = self.geometry;
        let p = &self.provenance;
        let plans = self.key_split.as_ref().map(|plans| {
            plans
                .iter()
                .map(|plan| match plan {
                    None => Value::Null,
                    Some(plan) => json!({
                        "for_codec": plan.for_codec().to_string(),
                        "chunks": plan.chunks().iter().map(|c| c.map(|c| c.to_string())).collect::<Vec<_>>(),
                        "order": plan.order(),
                        "scale": floats(plan.scale()),
                    }),
                })
                .collect::<Vec<_>>()
        });
        let doc = json!({
            "format": FORMAT,
            "version": VERSION,
            "checksum": self.checksum(),
            "model": {
                "fingerprint": self.model.hex(),
                "layers": layers,
                "kv_heads": kv_heads,
                "head_dim": head_dim,
                "rope_base": f64::from(self.rope_base),
            },
            "setting": self.setting.to_string(),
            "calibration": {
                "text": p.text,
                "windows": p.windows,
                "skip_windows": p.skip_windows,
                "window": p.window,
                "budget_bits": p.budget_bits,
                "bits_per_element": p.bits_per_element,
            },
            "key_means": self.key_means.as_deref().map(floats),
            "key_split": plans,
        });
        let text = serde_json::to_string_pretty(&doc).expect("a JSON value serializes");
        one_line_lists(&text)
    }

    /// Writes the profile to `path`, after checking that its parts fit together and that the
    /// JSON reads back as the same profile (a value JSON cannot hold, e.g. NaN, is refused).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.to_json();
        self.check_parts()
            .and_then(|()| match Self::from_json(&json) {
                Ok(back) if back == *self => Ok(()),
                Ok(_) => Err("it does not read back as written".to_string()),
                Err(reason) => Err(format!("it does not read back: {reason}")),
            })
            .map_err(|reason| bad(path, reason))?;
        std::fs::write(path, json).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a profile: the format, version and checksum must hold, and every part must fit
    /// the geometry it states.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|reason| bad(path, reason))
    }

    /// Parses a profile's JSON; the error says what is wrong.
    fn from_json(text: &str) -> std::result::Result<Self, String> {
        let doc: Value =
            serde_json::from_str(text).map_err(|e| format!("not a JSON profile: {e}"))?;
        if doc["format"] != FORMAT {
            return Err(format!(
                "not a pagedkv KV profile (format {})",
                doc["format"]
            ));
        }
        if doc["version"] != VERSION {
            return Err(format!(
                "profile version {} (this build reads version {VERSION})",
                doc["version"]
            ));
        }
        let field = Field(&doc);
        let fingerprint = field.str("model.fingerprint")?;
        let model = u128::from_str_radix(fingerprint, 16)
            .ok()
            .filter(|_| fingerprint.len() == 32)
            .map(ModelFingerprint)
            .ok_or("model.fingerprint is not 32 hex digits")?;
        let geometry = (
            field.count("model.layers")?,
            field.count("model.kv_heads")?,
            field.count("model.head_dim")?,
        );
        let setting: CodecPair = field
            .str("setting")?
            .parse()
            .map_err(|e| format!("setting: {e}"))?;
        let key_means = match field.get("key_means")? {
            Value::Null => None,
            v => Some(f32s(v, "key_means")?),
        };
        let key_split = match field.get("key_split")? {
            Value::Null => None,
            Value::Array(plans) => Some(
                plans
                    .iter()
                    .enumerate()
                    .map(|(layer, plan)| read_plan(plan, geometry.2, layer))
                    .collect::<std::result::Result<Vec<_>, String>>()?,
            ),
            _ => return Err("key_split is not a list".into()),
        };
        let profile = Self {
            model,
            geometry,
            rope_base: field.number("model.rope_base")? as f32,
            setting,
            key_means,
            key_split,
            provenance: Provenance {
                text: field.str("calibration.text")?.to_string(),
                windows: field.count("calibration.windows")?,
                skip_windows: field.count("calibration.skip_windows")?,
                window: field.count("calibration.window")?,
                budget_bits: field.number("calibration.budget_bits")?,
                bits_per_element: field.number("calibration.bits_per_element")?,
            },
        };
        let stated = field.str("checksum")?;
        if stated != profile.checksum() {
            return Err(format!(
                "its checksum {stated} does not match its content ({}): the file is damaged or was edited",
                profile.checksum()
            ));
        }
        profile.check_parts()?;
        Ok(profile)
    }

    /// The means and plans agree with the geometry and the setting.
    fn check_parts(&self) -> std::result::Result<(), String> {
        let (layers, kv_heads, head_dim) = self.geometry;
        let s = &self.setting;
        if s.key_norm != self.key_means.is_some() {
            return Err("the setting's +keynorm/+keysplit and the key means disagree".into());
        }
        if s.key_split != self.key_split.is_some() {
            return Err("the setting's +keysplit and the key split plans disagree".into());
        }
        if let Some(means) = &self.key_means {
            let expected = layers
                .checked_mul(kv_heads)
                .and_then(|n| n.checked_mul(head_dim))
                .ok_or("the geometry is too large")?;
            if means.len() != expected {
                return Err(format!(
                    "{} key means for {layers} layers × {kv_heads} kv heads × {head_dim}",
                    means.len()
                ));
            }
        }
        if let Some(plans) = &self.key_split {
            if plans.len() != layers {
                return Err(format!(
                    "{} key split plans for {layers} layers",
                    plans.len()
                ));
            }
            KeySplit::new(kv_heads, head_dim, plans.clone()).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Whether key means can be fitted and applied on this model: [`KeyNorm`] rotates the means
/// with interleaved RoPE at the plain frequencies.
pub fn key_norm_supported(config: &ModelConfig) -> Result<()> {
    if config.architecture.rope_style() != RopeStyle::Interleaved
        || config.rope_scaling != RopeScaling::None
    {
        return Err(EngineError::InvalidArgument(format!(
            "key normalization (+keynorm, +keysplit) needs unscaled interleaved RoPE; {} rotates {:?} with {:?} scaling",
            config.architecture.name(),
            config.architecture.rope_style(),
            config.rope_scaling
        )));
    }
    Ok(())
}

/// Pretty JSON with every list of plain values on one line (the means and plans are thousands
/// of numbers: a line each would make the file long, not readable).
fn one_line_lists(pretty: &str) -> String {
    let lines: Vec<&str> = pretty.lines().collect();
    let plain = |line: &str| {
        let t = line.trim();
        !(t.ends_with('{') || t.ends_with('[') || t.starts_with('}') || t.starts_with(']'))
    };
    let mut out = String::with_capacity(pretty.len());
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.ends_with('[') {
            let end = (i + 1..lines.len()).find(|&j| !plain(lines[j]));
            if let Some(end) = end.filter(|&j| lines[j].trim_start().starts_with(']')) {
                out.push_str(line);
                let items: Vec<&str> = lines[i + 1..end].iter().map(|l| l.trim()).collect();
                out.push_str(&items.join(" "));
                out.push_str(lines[end].trim_start());
                out.push('\n');
                i = end + 1;
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
        i += 1;
    }
    out
}

fn f32s(v: &Value, what: &str) -> std::result::Result<Vec<f32>, String> {
    v.as_array()
        .ok_or(format!("{what} is not a list of numbers"))?
        .iter()
        .map(|x| {
            x.as_f64()
                .map(|x| x as f32)
                .filter(|x| x.is_finite())
                .ok_or(format!("{what} holds a value that is not a finite number"))
        })
        .collect()
}

fn read_plan(
    plan: &Value,
    head_dim: usize,
    layer: usize,
) -> std::result::Result<Option<SplitPlan>, String> {
    if plan.is_null() {
        return Ok(None);
    }
    let what = |f: &str| format!("key_split[{layer}].{f}");
    let codec = |s: &str| s.parse::<Codec>().map_err(|e| e.to_string());
    let for_codec = codec(
        plan["for_codec"]
            .as_str()
            .ok_or(format!("{} is not a codec name", what("for_codec")))?,
    )?;
    let chunks = plan["chunks"]
        .as_array()
        .ok_or(format!("{} is not a list", what("chunks")))?
        .iter()
        .map(|c| match c {
            Value::Null => Ok(None),
            Value::String(s) => codec(s).map(Some),
            _ => Err(format!(
                "{} holds a value that is not a codec",
                what("chunks")
            )),
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    let order = plan["order"]
        .as_array()
        .ok_or(format!("{} is not a list", what("order")))?
        .iter()
        .map(|o| {
            o.as_u64()
                .and_then(|o| u16::try_from(o).ok())
                .ok_or(format!(
                    "{} holds a value that is not a coordinate",
                    what("order")
                ))
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    let scale = f32s(&plan["scale"], &what("scale"))?;
    SplitPlan::new(for_codec, head_dim, chunks, order, scale)
        .map(Some)
        .map_err(|e| format!("{}: {e}", what("plan")))
}

/// Typed reads of dotted paths in a profile's JSON, each error naming the path.
struct Field<'a>(&'a Value);

impl Field<'_> {
    fn get(&self, path: &str) -> std::result::Result<&Value, String> {
        let mut v = self.0;
        for part in path.split('.') {
            v = v.get(part).ok_or(format!("missing field `{path}`"))?;
        }
        Ok(v)
    }

    fn str(&self, path: &str) -> std::result::Result<&str, String> {
        self.get(path)?
            .as_str()
            .ok_or(format!("`{path}` is not a string"))
    }

    fn number(&self, path: &str) -> std::result::Result<f64, String> {
        self.get(path)?
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or(format!("`{path}` is not a number"))
    }

    fn count(&self, path: &str) -> std::result::Result<usize, String> {
        self.get(path)?
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or(format!("`{path}` is not a count"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_of_values_go_on_one_line_and_the_json_is_unchanged() {
        let doc = json!({"a": [1, 2.5, -3], "b": [{"c": [true, null]}, null], "d": [], "e": "x"});
        let pretty = serde_json::to_string_pretty(&doc).unwrap();
        let short = one_line_lists(&pretty);
        assert!(short.contains("\"a\": [1, 2.5, -3]"), "{short}");
        assert!(short.contains("\"c\": [true, null]"), "{short}");
        assert!(short.lines().count() < pretty.lines().count());
        assert_eq!(serde_json::from_str::<Value>(&short).unwrap(), doc);
    }
}
