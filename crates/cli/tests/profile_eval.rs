//! The repository's 2.5-bit SmolLM2 profile, loaded by `eval` on the default text, gives the
//! README's 2.5-bit row to its last printed digit, and fits nothing on the way (about 10 minutes
//! on 2 cores: 8 windows of 512 tokens, the f32 reference and the profile).

use std::process::Command;

/// The cells of the README's results row that names the profile: bits, KL, top-1, ΔPPL.
fn readme_row() -> [String; 4] {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with('|') && l.contains("profiles/smollm2-2.5bit.json"))
        .expect("the README has a row for the profile");
    let cells: Vec<&str> = line.split('|').map(str::trim).collect();
    // | name | bits | KL | top-1 | ΔPPL |
    [1, 2, 3, 4].map(|i| cells[i + 1].to_string())
}

/// `value` printed with as many decimals as `shown` has.
fn as_shown(value: f64, shown: &str) -> String {
    let digits = shown.trim_end_matches('%');
    let decimals = digits.split_once('.').map_or(0, |(_, d)| d.len());
    let sign = if digits.starts_with('+') || digits.starts_with('−') {
        "+"
    } else {
        ""
    };
    let mut out = format!("{value:.decimals$}");
    if !sign.is_empty() && value >= 0.0 {
        out.insert(0, '+');
    }
    if shown.ends_with('%') {
        out.push('%');
    }
    out
}

#[test]
fn the_2_5_bit_profile_reproduces_the_readme_row_without_fitting() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let json =
        std::env::temp_dir().join(format!("pagedkv-profile-eval-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_pagedkv"))
        .args(["--threads", "2", "--kv-profile"])
        .arg(format!("{root}/profiles/smollm2-2.5bit.json"))
        .args(["eval", "--json"])
        .arg(&json)
        .output()
        .expect("pagedkv runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("fitted"),
        "eval fitted something:\n{stdout}"
    );
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let (f32_row, row) = (&rows[0], &rows[1]);
    let number = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    let measured = [
        number(row, "bits_per_element"),
        number(row, "kl_mean"),
        100.0 * number(row, "top1"),
        100.0 * (number(row, "ppl") / number(f32_row, "ppl") - 1.0),
    ];
    let readme = readme_row();
    println!("README {readme:?}; measured {measured:?}");
    for (value, shown) in measured.iter().zip(&readme) {
        assert_eq!(&as_shown(*value, shown), shown, "measured {measured:?}");
    }
}
