//! The AWS proof of a join: a SigV4 header-signed `sts:GetCallerIdentity` request.
//!
//! Credentials and region come from `aws-config`'s standard chain (environment, profile,
//! instance role), loaded where the secrets load it (`crate::secrets::aws::Chain`). The request
//! is signed, not sent: the control plane forwards it to STS,
//! which answers with the caller's account and ARN. Its signed headers carry the control
//! plane's challenge and the CA fingerprint this appliance pinned, so the proof answers one
//! challenge of one control plane and a captured proof is worth nothing elsewhere or later.
//! An appliance that names its tenant or environment (`--tenant`, `--environment`) signs them too, so
//! the proof cannot be presented for another.
//! The credentials themselves never leave the host.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use airlock_proto::join::{
    AwsStsProof, CHALLENGE_HEADER, ENVIRONMENT_HEADER, GET_CALLER_IDENTITY_BODY, SERVER_ID_HEADER,
};
use aws_credential_types::provider::ProvideCredentials;

use crate::ApplianceError;
use crate::config::AwsJoinConfig;

/// How long the standard chain may take to name credentials and a region.
const CHAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The region signed for when neither the configuration nor the chain names one.
const DEFAULT_REGION: &str = "us-east-1";
const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";

fn failed(why: impl std::fmt::Display) -> ApplianceError {
    ApplianceError::PlatformIdentity(why.to_string())
}

/// Signs a `GetCallerIdentity` request carrying `challenge`, `server_id` and the tenant and environment the join
/// names (`target`).
pub(crate) async fn proof(
    cfg: &AwsJoinConfig,
    challenge: &str,
    server_id: &str,
    target: airlock_proto::join::JoinTarget,
) -> Result<AwsStsProof, ApplianceError> {
    let load = async {
        let chain = crate::secrets::aws::Chain::load(cfg.region.as_deref()).await;
        let region = chain.region.unwrap_or_else(|| DEFAULT_REGION.to_owned());
        let provider = chain.credentials.ok_or_else(|| failed("no AWS credentials provider in the standard chain"))?;
        // The top-level text only: a cause may quote a profile file's line.
        let creds = provider.provide_credentials().await.map_err(|e| failed(format!("no AWS credentials: {e}")))?;
        Ok::<_, ApplianceError>((region, creds))
    };
    let (region, creds) = tokio::time::timeout(CHAIN_TIMEOUT, load)
        .await
        .map_err(|_| failed("the AWS credential chain did not answer in time"))??;
    let url = match &cfg.sts_endpoint {
        Some(url) => url.clone(),
        None => reqwest::Url::parse(&format!("https://sts.{region}.amazonaws.com/")).map_err(failed)?,
    };
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        (None, _) => return Err(failed("the STS endpoint has no host")),
    };
    let environment = target.environment.map(|e| e.to_string());
    let tenant = target.tenant.map(|t| t.to_string());
    let mut headers = vec![
        ("host", host.as_str()),
        ("content-type", CONTENT_TYPE),
        (CHALLENGE_HEADER, challenge),
        (SERVER_ID_HEADER, server_id),
    ];
    if let Some(env) = &environment {
        headers.push((ENVIRONMENT_HEADER, env.as_str()));
    }
    if let Some(tenant) = &tenant {
        headers.push((airlock_proto::join::TENANT_HEADER, tenant.as_str()));
    }
    let identity = creds.into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(&region)
        .name("sts")
        .time(SystemTime::now())
        .settings(aws_sigv4::http_request::SigningSettings::default())
        .build()
        .map_err(failed)?
        .into();
    let signable = aws_sigv4::http_request::SignableRequest::new(
        "POST",
        url.as_str(),
        headers.iter().copied(),
        aws_sigv4::http_request::SignableBody::Bytes(GET_CALLER_IDENTITY_BODY.as_bytes()),
    )
    .map_err(failed)?;
    let (instructions, _) = aws_sigv4::http_request::sign(signable, &params).map_err(failed)?.into_parts();
    let (signed, _) = instructions.into_parts();
    let mut all: BTreeMap<String, String> = headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
    for h in &signed {
        all.insert(h.name().to_ascii_lowercase(), h.value().to_owned());
    }
    Ok(AwsStsProof { method: "POST".into(), url: url.to_string(), headers: all, body: GET_CALLER_IDENTITY_BODY.into() })
}
