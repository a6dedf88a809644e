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
