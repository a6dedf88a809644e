//! The simulator as a user starts it: its command line.

use std::process::Command;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mde-sim"))
        .args(args)
        .output()
        .expect("mde-sim runs")
}

#[test]
fn help_lists_the_time_scale() {
    let out = sim(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--time-scale"));
}

#[test]
fn bad_settings_exit_with_a_message_before_listening() {
    let out = sim(&["--listen", "127.0.0.1:0", "--time-scale=-1"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--time-scale must be a finite number >= 0"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("LISTENING"));
}

#[test]
fn help_lists_the_shared_quota_flags() {
    let out = sim(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--foreign-load",
        "MDE_SIM_FOREIGN_LOAD",
        "--quota-key",
        "MDE_SIM_QUOTA_KEY",
        "--retry-after",
        "MDE_SIM_RETRY_AFTER",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn a_bad_foreign_load_is_refused_at_start_with_the_reason() {
    for (spec, says) in [
        ("release:5", "unknown api \"release\""),
        ("unisolate:fast", "is not <api>:<calls per minute>[:burst]"),
        ("token:5", "foreign load cannot call \"token\""),
        ("isolate:0", "calls per minute must be 1..=10000"),
    ] {
        let out = sim(&["--listen", "127.0.0.1:0", "--foreign-load", spec]);
        assert_eq!(out.status.code(), Some(2), "{spec}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--foreign-load") && stderr.contains(says),
            "{spec}: {stderr}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("LISTENING"));
    }
    // The environment variable is checked the same way.
    let out = Command::new(env!("CARGO_BIN_EXE_mde-sim"))
        .args(["--listen", "127.0.0.1:0"])
        .env("MDE_SIM_FOREIGN_LOAD", "unisolate:5:sometimes")
        .output()
        .expect("mde-sim runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"unisolate:5:sometimes\" is not"));
}

#[test]
fn a_bad_isolated_by_in_the_seed_exits_2_with_the_reason() {
    for (isolated_by, says) in [
        (
            "isolatedBy: {requestor: x, source: Portal}",
            "unknown field `source`",
        ),
        ("isolatedBy: {requestor: x, at: tomorrow}", "isolatedBy.at"),
        (
            "isolated: false\n    isolatedBy: {requestor: x}",
            "cannot be combined with isolated: false",
        ),
        ("isolatedBy: {comment: c}", "missing field `requestor`"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seed.yaml");
        std::fs::write(
            &path,
            format!("machines:\n  - computerDnsName: a.contoso.local\n    {isolated_by}\n"),
        )
        .expect("write seed");
        let out = sim(&[
            "--listen",
            "127.0.0.1:0",
            "--seed",
            path.to_str().expect("utf8 path"),
        ]);
        assert_eq!(out.status.code(), Some(2), "{isolated_by}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{isolated_by}: {stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("LISTENING"));
    }
}
