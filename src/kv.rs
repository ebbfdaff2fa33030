//! `flotilla kv get|put|delete|list BUCKET`: the key-value buckets members
//! use through `wasi:keyvalue`, read and written through
//! `/v1/kv/NS/BUCKET[/KEY]` (authorized as the namespace's ConfigMaps).

use crate::client::Client;
use crate::table::Table;
use anyhow::{Context, Result};
use clap::Subcommand;
use flotilla_api::interfaces::size;
use std::io::{Read, Write};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum KvCmd {
    /// Print a key's value (raw bytes); exits 1 if the key is not there.
    Get { bucket: String, key: String },
    /// Set a key: VALUE as text, @FILE, or - for stdin.
    Put {
        bucket: String,
        key: String,
        value: String,
    },
    /// Remove a key (no error if it is not there).
    Delete { bucket: String, key: String },
    /// The bucket's keys, what it holds and its quota.
    List {
        bucket: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: crate::Output,
    },
}

pub fn run(c: &Client, ns: &str, cmd: KvCmd) -> Result<ExitCode> {
    match cmd {
        KvCmd::Get { bucket, key } => match c.kv_get(ns, &bucket, &key)? {
            Some(v) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&v)?;
                if std::io::IsTerminal::is_terminal(&out) && !v.ends_with(b"\n") {
                    out.write_all(b"\n")?;
                }
            }
            None => {
                eprintln!("error: bucket \"{bucket}\" has no key \"{key}\" (namespace {ns})");
                return Ok(ExitCode::FAILURE);
            }
        },
        KvCmd::Put { bucket, key, value } => {
            let bytes = match value.as_str() {
                "-" => {
                    let mut b = Vec::new();
                    std::io::stdin().read_to_end(&mut b)?;
                    b
                }
                v => match v.strip_prefix('@') {
                    Some(file) => {
                        std::fs::read(file).with_context(|| format!("cannot read {file}"))?
                    }
                    None => v.as_bytes().to_vec(),
                },
            };
            c.kv_put(ns, &bucket, &key, bytes)?;
        }
        KvCmd::Delete { bucket, key } => c.kv_delete(ns, &bucket, &key)?,
        KvCmd::List { bucket, output } => {
            let l = c.kv_list(ns, &bucket)?;
            match output {
                crate::Output::Json => crate::print_json(&l)?,
                _ => {
                    if l.keys.is_empty() {
                        println!("bucket \"{bucket}\" is empty (namespace {ns})");
                    } else {
                        let mut t = Table::new(&["KEY"]);
                        for k in &l.keys {
                            t.row(vec![k.clone()]);
                        }
                        print!("{}", t.render());
                    }
                    println!(
                        "{} keys of at most {}, {} of at most {}",
                        l.usage.keys,
                        l.limits.keys,
                        size(l.usage.bytes),
                        size(l.limits.bytes)
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
