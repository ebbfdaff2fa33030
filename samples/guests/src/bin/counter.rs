//! Runs forever, printing a counter every `INTERVAL_MS` milliseconds (default 1000).
use std::time::Duration;

fn main() {
    let interval = std::env::var("INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000u64);
    let mut n: u64 = 0;
    loop {
        println!("count {n}");
        n += 1;
        std::thread::sleep(Duration::from_millis(interval));
    }
}
