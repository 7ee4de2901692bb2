//! A tenant's identity provider: set (checked by fetching its discovery through `crate::issuer`) and shown, by `identity:manage` holders, each change audited.
//!
//! The client secret is sealed under the KEK with the tenant in its additional data, so a sealed secret cannot be moved to another tenant; it is opened only to redeem a code, and never returned, logged or audited.

use std::time::Duration;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::{TenantId, Timestamp};

use crate::authz::{Role, TenantScope};
use crate::issuer::IssuerError;
use crate::state::{AppState, event};
use crate::store::{IdpConfigRow, StoreError};

/// The longest step-up window a tenant may set.
pub const MAX_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);
const MAX_SCOPES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    #[error("{0}")]
    Invalid(String),
    #[error("no identity provider is configured for this tenant; set one with `airlock idp set`")]
    NotConfigured,
    /// The issuer's discovery could not be fetched or does not describe a provider this server can use.
    #[error("the identity provider's discovery: {0}")]
    Discovery(String),
    #[error("cannot seal or open the client secret: {0}")]
    Key(String),
    /// Only a tenant-wide owner sets the provider: whoever picks the issuer picks who signs in as every mapped
    /// role, owner included.
    #[error(
        "only an owner of the tenant sets its identity provider (whoever chooses the issuer chooses who signs in as an owner)"
    )]
    NotOwner,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an owner or admin sets.
#[derive(Debug)]
pub struct IdpSettings {
    pub issuer: String,
    pub client_id: String,
    /// Required the first time; absent later keeps the sealed one.
    pub client_secret: Option<String>,
    pub scopes: Vec<String>,
    pub groups_claim: String,
    pub require_mfa: bool,
    pub max_age: Option<Duration>,
}

/// A tenant's provider as shown: everything but the secret.
#[derive(Clone, Debug)]
pub struct IdpView {
    pub issuer: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub groups_claim: String,
    pub require_mfa: bool,
    pub max_age_seconds: Option<u64>,
    pub redirect_uri: String,
    pub updated_at: Timestamp,
    pub updated_by: String,
}

fn secret_aad(tenant: TenantId) -> Vec<u8> {
    format!("airlock idp client secret v1\0{tenant}").into_bytes()
}

/// The client secret of `tenant`'s provider, in clear, for one code redemption.
pub(crate) fn open_secret(state: &AppState, tenant: TenantId, row: &IdpConfigRow) -> Result<String, IdpError> {
    let plain =
        state.kek.open(&row.client_secret_sealed, &secret_aad(tenant)).map_err(|e| IdpError::Key(e.to_string()))?;
    String::from_utf8(plain).map_err(|_| IdpError::Key("the sealed client secret is not text".into()))
}

fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
}

fn check(s: &IdpSettings) -> Result<(), IdpError> {
    let url = reqwest::Url::parse(&s.issuer).map_err(|_| IdpError::Invalid("issuer must be an https URL".into()))?;
    if url.scheme() != "https" || s.issuer.len() > 512 || url.query().is_some() || url.fragment().is_some() {
        return Err(IdpError::Invalid("issuer must be an https URL of at most 512 characters, with no query".into()));
    }
    if !printable(&s.client_id, 256) {
        return Err(IdpError::Invalid("client id must be 1–256 printable characters".into()));
    }
    if s.client_secret.as_deref().is_some_and(|c| !printable(c, 1024)) {
        return Err(IdpError::Invalid("client secret must be 1–1024 printable characters".into()));
    }
    let scope_ok = |sc: &String| {
        !sc.is_empty() && sc.len() <= 64 && sc.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    };
    if s.scopes.len() > MAX_SCOPES || !s.scopes.iter().all(scope_ok) || !s.scopes.iter().any(|sc| sc == "openid") {
        return Err(IdpError::Invalid(format!(
            "scopes must include `openid`, at most {MAX_SCOPES} of them, each 1–64 visible characters"
        )));
    }
    if !printable(&s.groups_claim, 64) {
        return Err(IdpError::Invalid("groups claim must be 1–64 printable characters".into()));
    }
    if s.max_age.is_some_and(|m| m > MAX_MAX_AGE) {
        return Err(IdpError::Invalid("max age must be at most 7 days".into()));
    }
    Ok(())
}

fn discovery_error(e: IssuerError) -> IdpError {
    IdpError::Discovery(match e {
        IssuerError::NotAllowed(why) => format!("the issuer's address is not allowed: {why}"),
        IssuerError::Unreachable(why) => format!("cannot reach the issuer: {why}"),
        IssuerError::BadAnswer(why) => format!("the issuer's answer is not usable: {why}"),
    })
}

/// Sets the tenant's provider after its discovery answers with an authorization and a token endpoint.
pub async fn set(state: &AppState, scope: &TenantScope, settings: IdpSettings) -> Result<IdpView, IdpError> {
    check(&settings)?;
    let owner = scope.grants().is_some_and(|g| g.roles.iter().any(|(r, ws)| *r == Role::Owner && ws.is_none()));
    if !owner {
        return Err(IdpError::NotOwner);
    }
    let now = state.now();
    let discovery = state.issuers.discovery(&settings.issuer, now).await.map_err(discovery_error)?;
    if discovery.authorization_endpoint.is_none() || discovery.token_endpoint.is_none() {
        return Err(IdpError::Discovery("it names no authorization or no token endpoint".into()));
    }
    let existing = state.store.idp_config(scope).await?;
    let sealed = match (&settings.client_secret, existing) {
        (Some(secret), _) => {
            state.kek.seal(secret.as_bytes(), &secret_aad(scope.tenant())).map_err(|e| IdpError::Key(e.to_string()))?
        }
        // The sealed secret stays only with the client it was issued for: sent to another issuer's token endpoint it
        // would leave with whoever runs that issuer.
        (None, Some(existing)) if existing.issuer == settings.issuer && existing.client_id == settings.client_id => {
            existing.client_secret_sealed
        }
        (None, Some(_)) => {
            return Err(IdpError::Invalid(
                "a new issuer or client id needs its client secret again (the old one is never sent elsewhere)".into(),
            ));
        }
        (None, None) => return Err(IdpError::Invalid("a client secret is required the first time".into())),
    };
    let actor = scope.principal().actor();
    let max_age_seconds = settings.max_age.map(|m| m.as_secs());
    let row = IdpConfigRow {
        issuer: settings.issuer,
        client_id: settings.client_id,
        client_secret_sealed: sealed,
        scopes: settings.scopes,
        groups_claim: settings.groups_claim,
        require_mfa: settings.require_mfa,
        max_age_seconds,
        updated_at: now,
        updated_by: actor.clone(),
    };
    let mut tx = state.store.write().await?;
    tx.put_idp_config(scope, &row).await?;
    let mut ev = event(actor, AuditAction::IdpSet, Outcome::Success);
    ev.target = Some(row.issuer.clone());
    ev.detail = serde_json::json!({
        "issuer": row.issuer,
        "client_id": row.client_id,
        "client_secret_changed": settings.client_secret.is_some(),
        "scopes": row.scopes.join(" "),
        "groups_claim": row.groups_claim,
        "require_mfa": row.require_mfa,
        "max_age_seconds": row.max_age_seconds,
    });
    tx.audit(&scope.chain(), now, ev).await?;
    tx.commit().await?;
    Ok(view(state, row))
}

/// The tenant's provider, without its secret.
pub async fn show(state: &AppState, scope: &TenantScope) -> Result<IdpView, IdpError> {
    let row = state.store.idp_config(scope).await?.ok_or(IdpError::NotConfigured)?;
    Ok(view(state, row))
}

fn view(state: &AppState, row: IdpConfigRow) -> IdpView {
    IdpView {
        issuer: row.issuer,
        client_id: row.client_id,
        scopes: row.scopes,
        groups_claim: row.groups_claim,
        require_mfa: row.require_mfa,
        max_age_seconds: row.max_age_seconds,
        redirect_uri: state.sso.redirect_uri(),
        updated_at: row.updated_at,
        updated_by: row.updated_by,
    }
}
