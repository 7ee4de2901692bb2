//! The CA row: its certificate and its private key, sealed under the KEK.

use airlock_core::Timestamp;
use sqlx::Row;

use super::{Store, StoreError, WriteTx};

pub struct StoredCa {
    pub trust_domain: String,
    pub cert_pem: String,
    pub key_sealed: Vec<u8>,
}

impl Store {
    pub async fn load_ca(&self) -> Result<Option<StoredCa>, StoreError> {
        let row = sqlx::query("SELECT trust_domain, cert_pem, key_sealed FROM ca WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(StoredCa {
                trust_domain: r.try_get("trust_domain")?,
                cert_pem: r.try_get("cert_pem")?,
                key_sealed: r.try_get("key_sealed")?,
            })
        })
        .transpose()
    }
}

impl WriteTx<'_> {
    pub async fn put_ca(&mut self, ca: &StoredCa, now: Timestamp) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO ca (id, trust_domain, cert_pem, key_sealed, created_at) VALUES (1, $1, $2, $3, $4)")
            .bind(&ca.trust_domain)
            .bind(&ca.cert_pem)
            .bind(&ca.key_sealed)
            .bind(now.unix_millis())
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }
}
