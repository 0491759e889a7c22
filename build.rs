//! Tells the tests which storage servers this build can reach, so tests that need one show
//! as ignored (not passed) when it is absent: `fhirlog_test_s3` when moto's endpoint and
//! credentials are set, `fhirlog_test_azurite` when Azurite's URL is set (`.ci/run` sets
//! both); and `fhirlog_test_root` when the build runs as root on Linux, so tests that
//! mount a small file system or trace the server with strace run (CI runs as root); and
//! `fhirlog_test_inferno` when `FHIRLOG_TEST_INFERNO_CHECKS` names the Inferno-like
//! bulk-data checks script (`.ci/run` sets it when `../shared/tools` has it).

const S3_VARIABLES: [&str; 3] = [
    "FHIRLOG_TEST_S3_ENDPOINT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
];
const AZURITE_VARIABLE: &str = "AZURITE_BLOB_STORAGE_URL";
const INFERNO_CHECKS_VARIABLE: &str = "FHIRLOG_TEST_INFERNO_CHECKS";

fn is_set(variable: &str) -> bool {
    println!("cargo::rerun-if-env-changed={variable}");
    std::env::var_os(variable).is_some_and(|value| !value.is_empty())
}

/// Whether this process runs with effective user id 0 (Linux: `/proc/self/status`).
fn runs_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(fhirlog_test_root)");
    if runs_as_root() {
        println!("cargo::rustc-cfg=fhirlog_test_root");
    }
    println!("cargo::rustc-check-cfg=cfg(fhirlog_test_s3)");
    println!("cargo::rustc-check-cfg=cfg(fhirlog_test_azurite)");
    if S3_VARIABLES.iter().all(|variable| is_set(variable)) {
        println!("cargo::rustc-cfg=fhirlog_test_s3");
    }
    if is_set(AZURITE_VARIABLE) {
        println!("cargo::rustc-cfg=fhirlog_test_azurite");
    }
    println!("cargo::rustc-check-cfg=cfg(fhirlog_test_inferno)");
    if is_set(INFERNO_CHECKS_VARIABLE) {
        println!("cargo::rustc-cfg=fhirlog_test_inferno");
    }
}
