//! What the audit tests do to a data directory: copy it, and edit its database behind the server's back.

use std::path::Path;

/// Runs SQL against the database at `db` (of a stopped server, or of a copy).
pub(crate) async fn tamper(db: &Path, sql: &str) {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new().filename(db).connect().await.unwrap();
    sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
}

/// Copies the files (not the folders) of a data directory.
pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
