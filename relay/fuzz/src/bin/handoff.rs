//! AFL entry point of the `handoff` target ([`mailrelay_fuzz::handoff`]); see the crate README.

/// Under `cargo afl`: the persistent AFL loop.
#[cfg(fuzzing)]
fn main() {
    afl::fuzz!(|data: &[u8]| mailrelay_fuzz::handoff::fuzz_one(data));
}

/// Without AFL: runs the target on the files (or directories of files) named on the command
/// line, or on standard input, to reproduce a crash.
#[cfg(not(fuzzing))]
fn main() {
    mailrelay_fuzz::run_files(mailrelay_fuzz::handoff::fuzz_one);
}
