//! Replays a seeded corpus of hostile frames through the decoder (the same
//! inputs the `fuzz/` target starts from), plus deterministic mutations of
//! valid frames: no input may panic, hang, or decode past an error.

use flotilla_api::proto::{AgentMsg, FrameDecoder, FrameError, NodeInfo, SchedulerMsg, encode};

fn seeds() -> Vec<Vec<u8>> {
    let hello = encode(&AgentMsg::Hello {
        version: 1,
        node: NodeInfo {
            name: "n".into(),
            labels: [("a".into(), "b".into())].into(),
            allocatable: Default::default(),
            arch: "x86_64".into(),
            version: "v".into(),
            runtimes: vec!["wasm".into()],
            pod_network: String::new(),
            gateway_tls: false,
        },
    });
    let mut v = vec![
        hello,
        encode(&AgentMsg::Heartbeat { seq: u64::MAX }),
        encode(&SchedulerMsg::Unassign {
            uid: "x".repeat(300),
        }),
        Vec::new(),
        b"FL".to_vec(),
        b"FL\x01\xff\xff\xff\xff".to_vec(),
        b"FL\x01\x00\x00\x00\x05{\"a\"".to_vec(),
        b"FL\x01\x00\x00\x00\x04null".to_vec(),
        b"FL\x01\x00\x00\x00\x02[]".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        vec![0; 1024],
        vec![0xff; 17],
    ];
    // Deep nesting must not blow the stack.
    let mut deep = b"FL\x01".to_vec();
    let body = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    deep.extend_from_slice(&(body.len() as u32).to_be_bytes());
    deep.extend_from_slice(body.as_bytes());
    v.push(deep);
    // Inputs checked in under fuzz/corpus join the seeds.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/frame_decoder");
    let files: Vec<_> = std::fs::read_dir(dir)
        .expect("fuzz corpus dir")
        .flatten()
        .collect();
    assert!(!files.is_empty());
    for e in files {
        v.push(std::fs::read(e.path()).unwrap());
    }
    v
}

/// xorshift64*: deterministic, seedable mutations without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn run(input: &[u8], split: usize) {
    let split = split.min(input.len());
    for max in [64usize, 1 << 20] {
        let mut d = FrameDecoder::new(max);
        'chunks: for chunk in [&input[..split], &input[split..]] {
            d.push(chunk);
            loop {
                match d.decode::<AgentMsg>() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, max: m }) => {
                        assert!(len > m);
                        break 'chunks;
                    }
                    Err(_) => break 'chunks,
                }
            }
        }
        let mut s = FrameDecoder::new(max);
        s.push(input);
        while let Ok(Some(_)) = s.decode::<SchedulerMsg>() {}
    }
}

#[test]
fn seeded_corpus_never_panics() {
    let seeds = seeds();
    let mut rng = Rng(0x0005_eedf_10a7_111a);
    for seed in &seeds {
        for split in [0, 1, 2, 3, 6, 7, seed.len() / 2, seed.len()] {
            run(seed, split);
        }
        // Mutations: flipped bits, truncations, duplications, length lies.
        for _ in 0..300 {
            let mut m = seed.clone();
            match rng.next() % 4 {
                0 if !m.is_empty() => {
                    let i = (rng.next() as usize) % m.len();
                    m[i] ^= 1 << (rng.next() % 8);
                }
                1 => m.truncate((rng.next() as usize) % (m.len() + 1)),
                2 => {
                    let copy = m.clone();
                    m.extend_from_slice(&copy);
                }
                _ if m.len() >= 7 => {
                    let len = (rng.next() as u32).to_be_bytes();
                    m[3..7].copy_from_slice(&len);
                }
                _ => m.push(rng.next() as u8),
            }
            let split = (rng.next() as usize) % (m.len() + 1);
            run(&m, split);
        }
    }
}

#[test]
fn valid_frames_survive_a_stream_of_duplicates() {
    let one = encode(&AgentMsg::Heartbeat { seq: 3 });
    let many: Vec<u8> = one.iter().copied().cycle().take(one.len() * 100).collect();
    let mut d = FrameDecoder::default();
    d.push(&many);
    let mut n = 0;
    while let Some(AgentMsg::Heartbeat { seq: 3 }) = d.decode::<AgentMsg>().unwrap() {
        n += 1;
    }
    assert_eq!(n, 100);
}
