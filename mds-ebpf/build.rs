use which::which;

/// Rebuild the programs when bpf-linker changes (it is upgraded by `cargo xtask setup`).
fn main() {
    let bpf_linker = which("bpf-linker")
        .expect("bpf-linker not found on PATH: run `cargo xtask setup` to install it");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
