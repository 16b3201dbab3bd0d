//! Build script: rebuild when a migration changes.

// Migrations are embedded by `sqlx::migrate!`; without this line a new migration file would not
// trigger a rebuild and the binary would silently ship the old schema.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
