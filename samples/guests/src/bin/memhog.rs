//! Allocates and touches memory one MiB at a time until it is stopped;
//! `memhog N`: holds N MiB, touched, and then sleeps (a member whose
//! memory is known, for metrics tests).
fn main() {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    let hold: Option<usize> = std::env::args().nth(1).and_then(|n| n.parse().ok());
    loop {
        if hold.is_some_and(|n| hoard.len() >= n) {
            println!("memhog: holding {} MiB; sleeping", hoard.len());
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        let chunk = vec![0xa5u8; 1 << 20];
        hoard.push(chunk);
        if hold.is_none() {
            println!("memhog: holding {} MiB", hoard.len());
        }
    }
}
