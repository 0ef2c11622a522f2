//! Work done once at build time instead of at every start of nvmm. Each concern is a module of
//! its own under `build/`.

#[path = "build/seccomp.rs"]
mod seccomp;

fn main() {
    if let Err(e) = seccomp::generate() {
        eprintln!("nvmm build: {e}");
        std::process::exit(1);
    }
}
