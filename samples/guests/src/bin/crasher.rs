//! Prints a line and exits with `EXIT_CODE` (default 3) after `DELAY_MS` (default 0).
fn main() {
    let code = std::env::var("EXIT_CODE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let delay = std::env::var("DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0u64);
    println!("crasher: about to exit with {code}");
    std::thread::sleep(std::time::Duration::from_millis(delay));
    std::process::exit(code);
}
