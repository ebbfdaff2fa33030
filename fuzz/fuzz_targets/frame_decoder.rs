//! Feeds arbitrary bytes, in arbitrary splits, to the frame decoder: it must
//! never panic, and must stop at the first error.
#![no_main]

use flotilla_api::proto::{AgentMsg, FrameDecoder, SchedulerMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize) % (data.len().max(1));
    for max in [64, 4096] {
        let mut agent = FrameDecoder::new(max);
        let mut sched = FrameDecoder::new(max);
        for chunk in [&data[..split], &data[split..]] {
            agent.push(chunk);
            sched.push(chunk);
            while let Ok(Some(_)) = agent.decode::<AgentMsg>() {}
            while let Ok(Some(_)) = sched.decode::<SchedulerMsg>() {}
        }
    }
});
