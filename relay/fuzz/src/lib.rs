//! Fuzz targets for the relay's parsers that read what the network (or, for spool records,
//! the disk) hands them: the SMTP session core, the SASL exchanges, the PROXY header, the
//! spool's records and the hand-off listener's parameters. Each target is a `fuzz_one(&[u8])`
//! that panics on a broken invariant; the binaries in `src/bin` run them under AFL (`cargo afl
//! build`), and `tests/replay.rs` replays the committed corpora and crash regressions through
//! them in an ordinary `cargo test`.

pub mod auth;
pub mod handoff;
pub mod ntlm;
pub mod proxy;
pub mod seeds;
pub mod session;
pub mod spool;

/// Input-derived decisions: bytes handed out one at a time, cyclically; 0 when there are none,
/// so that an empty decision stream means "the usual answer" everywhere.
pub struct Choices<'a> {
    bytes: &'a [u8],
    next: usize,
}

impl<'a> Choices<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Choices { bytes, next: 0 }
    }

    pub fn byte(&mut self) -> u8 {
        if self.bytes.is_empty() {
            return 0;
        }
        let b = self.bytes[self.next % self.bytes.len()];
        self.next += 1;
        b
    }
}

/// A small deterministic generator (xorshift64*) for split points derived from the input.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `1..=max`.
    pub fn upto(&mut self, max: usize) -> usize {
        1 + (self.next_u64() % max.max(1) as u64) as usize
    }
}

/// Runs `target` on every file named on the command line (directories: every file in them),
/// or on standard input when none is named. For reproducing a crash outside AFL.
pub fn run_files(target: fn(&[u8])) {
    let args: Vec<std::path::PathBuf> = std::env::args_os().skip(1).map(Into::into).collect();
    if args.is_empty() {
        let mut input = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut input) {
            eprintln!("reading standard input: {e}");
            std::process::exit(2);
        }
        target(&input);
        return;
    }
    for path in args {
        for file in files(&path) {
            match std::fs::read(&file) {
                Ok(bytes) => {
                    eprintln!("{}", file.display());
                    target(&bytes);
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    std::process::exit(2);
                }
            }
        }
    }
}

/// `path` itself, or the files in it (sorted) when it is a directory.
pub fn files(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    if !path.is_dir() {
        return vec![path.to_path_buf()];
    }
    let mut out: Vec<_> = std::fs::read_dir(path)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.retain(|p| p.is_file());
    out.sort();
    out
}
