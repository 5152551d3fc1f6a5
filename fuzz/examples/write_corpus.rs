//! Regenerates the seeds in `fuzz/corpus/<target>/` from the real encoders:
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example write_corpus
//!
//! Only the named seeds are written (files libFuzzer added are left alone); each must be
//! accepted by its target's decoders.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in ferry_fuzz::seeds::all() {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            assert!(
                ferry_fuzz::check(target, &bytes),
                "seed {target}/{name} is not accepted"
            );
            std::fs::write(dir.join(&name), &bytes)?;
            println!("{target}/{name}: {} bytes", bytes.len());
        }
    }
    Ok(())
}
