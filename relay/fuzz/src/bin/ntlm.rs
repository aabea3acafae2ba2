//! AFL entry point of the `ntlm` target ([`mailrelay_fuzz::ntlm`]); see the crate README.

/// Under `cargo afl`: the persistent AFL loop.
#[cfg(fuzzing)]
fn main() {
    afl::fuzz!(|data: &[u8]| mailrelay_fuzz::ntlm::fuzz_one(data));
}

/// Without AFL: runs the target on the files (or directories of files) named on the command
/// line, or on standard input, to reproduce a crash.
#[cfg(not(fuzzing))]
fn main() {
    mailrelay_fuzz::run_files(mailrelay_fuzz::ntlm::fuzz_one);
}
