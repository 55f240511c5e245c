//! Runs the fuzz target bodies without libFuzzer, on stable Rust:
//!
//! * `replay <target> <file|dir>...` — feeds each file (a crash artifact, a corpus) to the target
//!   and says which one panics;
//! * `replay seed [dir]` — writes the seed inputs to `<dir>/<target>/` (default `fuzz/corpus`,
//!   where `cargo fuzz run` looks first).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn files(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for e in entries {
            files(&e, out)?;
        }
    } else {
        out.push(path.to_owned());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = format!(
        "usage: replay <{}> <file|dir>...\n       replay seed [dir]",
        protocol_fuzz::TARGETS.join("|")
    );
    let Some((target, paths)) = args.split_first() else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    if target == "seed" {
        let root = PathBuf::from(paths.first().map_or("fuzz/corpus", String::as_str));
        for t in protocol_fuzz::TARGETS {
            let dir = root.join(t);
            if let Err(e) = std::fs::create_dir_all(&dir) {
                eprintln!("{}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
            let seeds = protocol_fuzz::seeds(t);
            for (i, s) in seeds.iter().enumerate() {
                let f = dir.join(format!("seed-{i:02}"));
                if let Err(e) = std::fs::write(&f, s) {
                    eprintln!("{}: {e}", f.display());
                    return ExitCode::FAILURE;
                }
            }
            println!("{}: {} seeds", dir.display(), seeds.len());
        }
        return ExitCode::SUCCESS;
    }
    if !protocol_fuzz::TARGETS.contains(&target.as_str()) || paths.is_empty() {
        eprintln!("{usage}");
        return ExitCode::from(2);
    }
    let mut inputs = Vec::new();
    for p in paths {
        if let Err(e) = files(Path::new(p), &mut inputs) {
            eprintln!("{p}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut failed = 0;
    for f in &inputs {
        let data = match std::fs::read(f) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{}: {e}", f.display());
                return ExitCode::FAILURE;
            }
        };
        if std::panic::catch_unwind(|| protocol_fuzz::run(target, &data)).is_err() {
            eprintln!("CRASH {} ({} bytes)", f.display(), data.len());
            failed += 1;
        }
    }
    println!("{target}: {} inputs, {failed} crashed", inputs.len());
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
