//! Debian's Chromium, headless: a page loaded as a user's browser would (its scripts run, its
//! fetches go out), then its DOM or a screenshot. Flags keep it off the network it cannot
//! reach here and out of the machine's dbus and profile.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// How long a page's scripts and fetches may take (Chromium's virtual time waits for the
/// network).
const BUDGET_MS: u64 = 10_000;

fn chromium(profile: &Path) -> Command {
    let mut command = Command::new("chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,900",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command.arg(format!("--virtual-time-budget={BUDGET_MS}"));
    command
}

fn run(mut command: Command) -> std::process::Output {
    let started = std::time::Instant::now();
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("chromium (make deps-browser installs it): {e}"));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "chromium took {:?}",
        started.elapsed()
    );
    output
}

/// The DOM of `url` once its scripts ran (loopback URLs only).
pub fn dom(url: &str, profile: &Path) -> String {
    assert!(url.starts_with("http://127.0.0.1:"), "loopback only: {url}");
    let mut command = chromium(profile);
    command.arg("--dump-dom").arg(url);
    let output = run(command);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A PNG of `url` once its scripts ran, written to `png`.
pub fn screenshot(url: &str, profile: &Path, png: &Path) {
    assert!(url.starts_with("http://127.0.0.1:"), "loopback only: {url}");
    let mut command = chromium(profile);
    command
        .arg(format!("--screenshot={}", png.display()))
        .arg(url);
    let output = run(command);
    assert!(
        png.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
