//! Replays the committed corpus through the targets' checks (no libFuzzer needed), and
//! keeps the seeds in step with the encoders: a change to a format that the corpus does not
//! follow fails here, with the command that regenerates it.

use std::path::Path;

#[test]
fn every_committed_input_passes_its_target() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, _) in ferry_fuzz::seeds::all() {
        let dir = corpus.join(target);
        let mut inputs = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            // A panic here is a crash the fuzzer would report, with this file as its input.
            ferry_fuzz::check(target, &bytes);
            inputs += 1;
        }
        assert!(inputs > 0, "{} is empty", dir.display());
    }
}

#[test]
fn the_committed_seeds_are_what_the_encoders_make() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in ferry_fuzz::seeds::all() {
        for (name, bytes) in seeds {
            assert!(
                ferry_fuzz::check(target, &bytes),
                "seed {target}/{name} is refused"
            );
            let path = corpus.join(target).join(&name);
            assert!(
                std::fs::read(&path).is_ok_and(|committed| committed == bytes),
                "{} is missing or stale: run `cargo run --manifest-path fuzz/Cargo.toml --example write_corpus`",
                path.display()
            );
        }
    }
}
