//! A component exporting Flotilla's health check (`wit/health.wit`).
//!
//! `main` is the member: it rewrites `$BEAT_DIR/beat` (default `/data`)
//! every 100 ms until `$BEAT_DIR/hang` exists, then keeps running without
//! beating — a member that hangs but does not exit. `check` runs in a fresh
//! instance beside it (the agent's `health` probe): healthy while the beat
//! is under two seconds old. `HEALTH_SAYS`, if set, is returned as the
//! failure instead (a check that always fails, for tests).

use std::time::Duration;

wit_bindgen::generate!({
    path: "../../wit/health.wit",
    world: "probed",
});

fn beat_dir() -> String {
    std::env::var("BEAT_DIR").unwrap_or_else(|_| "/data".into())
}

struct Health;

impl exports::flotilla::health::check::Guest for Health {
    fn check() -> Result<(), String> {
        if let Ok(says) = std::env::var("HEALTH_SAYS") {
            return Err(says);
        }
        let beat = format!("{}/beat", beat_dir());
        let meta = std::fs::metadata(&beat).map_err(|e| format!("no heartbeat at {beat}: {e}"))?;
        let age = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if age > Duration::from_secs(2) {
            return Err(format!("no heartbeat for {} s", age.as_secs()));
        }
        Ok(())
    }
}

export!(Health);

fn main() {
    let dir = beat_dir();
    let (beat, hang) = (format!("{dir}/beat"), format!("{dir}/hang"));
    println!("beating in {dir}");
    let mut told = false;
    loop {
        if std::fs::metadata(&hang).is_ok() {
            if !told {
                println!("hanging (not beating, still running)");
                told = true;
            }
        } else {
            let _ = std::fs::write(&beat, b"beat");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
