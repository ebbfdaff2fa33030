//! Burns CPU forever without making a single host call.
fn main() {
    println!("spinner: spinning");
    let mut x: u64 = 1;
    loop {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if x == 0 {
            println!("impossible");
        }
    }
}
