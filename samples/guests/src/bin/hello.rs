//! Prints a greeting, its arguments and one environment variable, then exits 0.
fn main() {
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".into());
    println!("{greeting} from Flotilla!");
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.is_empty() {
        println!("args: {}", args.join(" "));
    }
    eprintln!("hello: done");
}
