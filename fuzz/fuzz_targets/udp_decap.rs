//! cargo +nightly fuzz run udp_decap: every byte string the udp backend's decap side (and the
//! TUN-read side) can be handed; see `tweed_agent::backend::udp::fuzz`. A crash found here is
//! added as a unit test there.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tweed_agent::backend::udp::fuzz::fuzz_one(data);
});
