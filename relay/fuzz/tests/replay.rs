//! Replays every committed corpus file and crash regression through its target, so the targets
//! keep compiling and keep holding on the inputs that matter without AFL. Also keeps the
//! committed seeds identical to the ones `src/seeds.rs` builds.
//!
//! Regenerate the seeds after changing them:
//! `cargo test --test replay -- --ignored regenerate_seeds`

use std::path::{Path, PathBuf};

use mailrelay_fuzz::{auth, files, handoff, ntlm, proxy, seeds, session, spool};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `target` on `corpus/<name>` and `regressions/<name>`; returns how many corpus files ran.
fn replay(name: &str, target: fn(&[u8])) -> usize {
    let mut corpus = 0;
    for dir in ["corpus", "regressions"] {
        let dir = root().join(dir).join(name);
        for file in files(&dir) {
            if !file.is_file() || file.file_name().is_some_and(|n| n == "README.md") {
                continue;
            }
            let bytes = std::fs::read(&file).expect("readable corpus file");
            if std::panic::catch_unwind(|| target(&bytes)).is_err() {
                panic!("{} fails target {name}", file.display());
            }
            if dir.ends_with(Path::new("corpus").join(name)) {
                corpus += 1;
            }
        }
    }
    corpus
}

#[test]
fn session_corpus_replays() {
    assert!(
        replay("session", session::fuzz_one) > 0,
        "no session corpus"
    );
}

#[test]
fn auth_corpus_replays() {
    assert!(replay("auth", auth::fuzz_one) > 0, "no auth corpus");
}

#[test]
fn proxy_corpus_replays() {
    assert!(replay("proxy", proxy::fuzz_one) > 0, "no proxy corpus");
}

#[test]
fn spool_corpus_replays() {
    assert!(replay("spool", spool::fuzz_one) > 0, "no spool corpus");
}

#[test]
fn handoff_corpus_replays() {
    assert!(
        replay("handoff", handoff::fuzz_one) > 0,
        "no handoff corpus"
    );
}

#[test]
fn ntlm_corpus_replays() {
    assert!(replay("ntlm", ntlm::fuzz_one) > 0, "no ntlm corpus");
}

#[test]
fn committed_seeds_are_current() {
    for s in seeds::all() {
        let path = root().join("corpus").join(s.target).join(s.name);
        let committed = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; regenerate the seeds", path.display()));
        assert!(
            committed == s.bytes,
            "{} differs from src/seeds.rs; regenerate the seeds",
            path.display()
        );
    }
}

#[test]
#[ignore = "writes the seed corpus"]
fn regenerate_seeds() {
    for s in seeds::all() {
        let dir = root().join("corpus").join(s.target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(s.name), &s.bytes).expect("seed written");
    }
}
