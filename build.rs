//! Rebuilds the crate when a migration is added: `sqlx::migrate!` embeds `migrations/` at
//! compile time, but on stable Rust it cannot tell cargo to watch the directory, so a new
//! migration file would otherwise leave an incremental build with the old set embedded.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
