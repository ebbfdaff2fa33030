//! Allocates and touches memory one MiB at a time until it is stopped.
fn main() {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let chunk = vec![0xa5u8; 1 << 20];
        hoard.push(chunk);
        println!("memhog: holding {} MiB", hoard.len());
    }
}
