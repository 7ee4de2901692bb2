//! AWS Secrets Manager and SSM Parameter Store secrets.
//!
//! Four JSON 1.1 calls, written by hand and signed with `aws-sigv4`, sent with the appliance's
//! own `reqwest`: the SDK's service crates (`aws-sdk-secretsmanager`, `aws-sdk-ssm`) would add
//! minutes of build for four requests. Credentials and region come from `aws-config`'s standard
//! chain (environment, profile, instance role), loaded at the first call.
//!
//! Existence uses `DescribeSecret` and `DescribeParameters` only; `GetSecretValue` and
//! `GetParameter` (with decryption) are made by the value calls alone. Every call is bounded in
//! time (`timeout_ms`) and in the bytes it reads; an error answer yields only its sanitised
//! error code, and its body (which, for a value call, might echo a value) is dropped unread.
//! A Secrets Manager secret stored as binary is handed over as the base64 text AWS sends, since
//! an environment variable cannot hold arbitrary bytes.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use airlock_core::Timestamp;
use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use reqwest::Url;
use serde::{Deserialize, Deserializer};
use zeroize::Zeroizing;

use super::{AwsSecretsConfig, SecretReason, SecretValue};

/// One AWS call's time limit unless configured.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most an answer may weigh: a secret is at most 64 KiB, which JSON escaping can swell.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// `DescribeParameters` may answer a filtered query with empty pages; this many are followed.
const MAX_PARAMETER_PAGES: usize = 10;
/// Credentials without an expiry (static keys) are asked for again after this long.
const CREDENTIALS_REFRESH: Duration = Duration::from_secs(300);

/// An AWS region name, e.g. `eu-west-1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsRegion(String);

impl<'de> Deserialize<'de> for AwsRegion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok { Ok(Self(s)) } else { Err(serde::de::Error::custom("an AWS region looks like `eu-west-1`")) }
    }
}

/// A service endpoint: an `http` or `https` URL with a host and nothing after the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsEndpoint(Url);

impl std::str::FromStr for AwsEndpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let url = Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
        let ok = matches!(url.scheme(), "http" | "https")
            && url.host_str().is_some()
            && url.username().is_empty()
            && url.password().is_none()
            && url.query().is_none()
            && url.fragment().is_none();
        if ok { Ok(Self(url)) } else { Err(format!("`{s}`: an endpoint is http(s)://HOST[:PORT][/PATH]")) }
    }
}

impl<'de> Deserialize<'de> for AwsEndpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    SecretsManager,
    Ssm,
}

impl Service {
    /// The SigV4 signing name, which is also the endpoint's first label.
    fn name(self) -> &'static str {
        match self {
            Self::SecretsManager => "secretsmanager",
            Self::Ssm => "ssm",
        }
    }
}

/// How a call failed: before an answer, or with an AWS error code.
#[derive(Debug)]
enum CallError {
    Reason(SecretReason),
    Aws { status: u16, code: String },
}

impl From<SecretReason> for CallError {
    fn from(r: SecretReason) -> Self {
        Self::Reason(r)
    }
}

impl CallError {
    /// The reason, for the codes every call shares; `not_found` lists the call's own.
    fn reason(self, not_found: &[&str]) -> SecretReason {
        match self {
            Self::Reason(r) => r,
            Self::Aws { code, .. } if not_found.contains(&code.as_str()) => SecretReason::NotFound,
            Self::Aws { status, code } => match code.as_str() {
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "IncompleteSignature"
                | "MissingAuthenticationToken"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "ExpiredTokenException" => SecretReason::AccessDenied,
                _ if status == 401 || status == 403 => SecretReason::AccessDenied,
                _ => SecretReason::ServiceError,
            },
        }
    }
}

/// The standard chain's answer (environment, profile, instance role): the one home where the
/// appliance finds AWS credentials and a region, for secrets and for the AWS join (`crate::join`).
pub(crate) struct Chain {
    pub(crate) region: Option<String>,
    pub(crate) credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
}

impl Chain {
    /// Loads the standard chain, `region` overriding the one it would name. Its HTTP client (for
    /// the instance metadata service and STS) is the ring-backed rustls one.
    pub(crate) async fn load(region: Option<&str>) -> Self {
        let client = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(client);
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region.to_owned()));
        }
        let sdk = loader.load().await;
        Chain { region: sdk.region().map(|r| r.to_string()), credentials: sdk.credentials_provider() }
    }
}

pub(super) struct Aws {
    http: Option<reqwest::Client>,
    region: Option<String>,
    secretsmanager_endpoint: Option<Url>,
    ssm_endpoint: Option<Url>,
    timeout: Duration,
    fixed_credentials: Option<Credentials>,
    chain: tokio::sync::OnceCell<Chain>,
    /// The chain's last credentials and when to ask again.
    credentials: Mutex<Option<(Credentials, SystemTime)>>,
}

impl std::fmt::Debug for Aws {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aws")
            .field("region", &self.region)
            .field("secretsmanager_endpoint", &self.secretsmanager_endpoint.as_ref().map(Url::as_str))
            .field("ssm_endpoint", &self.ssm_endpoint.as_ref().map(Url::as_str))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    // An unreadable system store leaves AWS over HTTPS unverifiable, hence unreachable; a
    // configured http:// endpoint still works.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    let tls = airlock_proto::tls::third_party_client_config(roots).map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())
}

/// Epoch seconds (JSON 1.1 timestamps) as a [`Timestamp`].
fn epoch_seconds(s: f64) -> Option<Timestamp> {
    let ms = (s * 1000.0).round();
    (ms.is_finite() && ms.abs() < 1e15).then(|| Timestamp::from_unix_millis(ms as i64))
}

/// The error code of an AWS JSON error: `__type` or the `x-amzn-errortype` header, without
/// its namespace or suffix, letters and digits only, so nothing else of the body survives.
fn error_code(header: Option<&str>, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(rename = "__type")]
        kind: Option<String>,
    }
    let from_body = serde_json::from_slice::<ErrorBody>(body).ok().and_then(|b| b.kind);
    let raw = header.map(str::to_owned).or(from_body).unwrap_or_default();
    let raw = raw.rsplit('#').next().unwrap_or_default();
    let raw = raw.split(':').next().unwrap_or_default();
    raw.chars().filter(char::is_ascii_alphanumeric).take(64).collect()
}

impl Aws {
    pub(super) fn new(config: &AwsSecretsConfig, fixed_credentials: Option<Credentials>) -> Self {
        let timeout = config.timeout_ms.map_or(DEFAULT_TIMEOUT, Duration::from_millis).max(Duration::from_millis(1));
        let http = http_client(timeout)
            .inspect_err(|e| tracing::error!(error = %e, "cannot build the HTTP client for AWS secrets"))
            .ok();
        Self {
            http,
            region: config.region.as_ref().map(|r| r.0.clone()),
            secretsmanager_endpoint: config.secretsmanager_endpoint.as_ref().map(|e| e.0.clone()),
            ssm_endpoint: config.ssm_endpoint.as_ref().map(|e| e.0.clone()),
            timeout,
            fixed_credentials,
            chain: tokio::sync::OnceCell::new(),
            credentials: Mutex::new(None),
        }
    }

    async fn chain(&self) -> &Chain {
        self.chain.get_or_init(|| Chain::load(self.region.as_deref())).await
    }

    async fn region(&self) -> Result<String, SecretReason> {
        if let Some(region) = &self.region {
            return Ok(region.clone());
        }
        let chain = tokio::time::timeout(self.timeout, self.chain()).await.map_err(|_| SecretReason::NoRegion)?;
        chain.region.clone().ok_or(SecretReason::NoRegion)
    }

    async fn credentials(&self) -> Result<Credentials, SecretReason> {
        if let Some(fixed) = &self.fixed_credentials {
            return Ok(fixed.clone());
        }
        let now = SystemTime::now();
        if let Some((creds, until)) = self.credentials.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
            && now < *until
        {
            return Ok(creds.clone());
        }
        let fetch = async {
            let provider = self.chain().await.credentials.clone().ok_or(SecretReason::NoCredentials)?;
            provider.provide_credentials().await.map_err(|e| {
                // The top-level text only: a cause may quote a profile file's line.
                tracing::warn!(error = %e, "no AWS credentials from the standard chain");
                SecretReason::NoCredentials
            })
        };
        let creds = tokio::time::timeout(self.timeout, fetch).await.map_err(|_| SecretReason::NoCredentials)??;
        // Refreshed a minute before they expire, or every few minutes for static keys.
        let until = creds
            .expiry()
            .and_then(|e| e.checked_sub(Duration::from_secs(60)))
            .unwrap_or(now + CREDENTIALS_REFRESH)
            .min(now + CREDENTIALS_REFRESH);
        *self.credentials.lock().unwrap_or_else(|e| e.into_inner()) = Some((creds.clone(), until));
        Ok(creds)
    }

    async fn endpoint(&self, service: Service) -> Result<Url, SecretReason> {
        let configured = match service {
            Service::SecretsManager => &self.secretsmanager_endpoint,
            Service::Ssm => &self.ssm_endpoint,
        };
        if let Some(url) = configured {
            return Ok(url.clone());
        }
        let region = self.region().await?;
        Url::parse(&format!("https://{}.{region}.amazonaws.com/", service.name())).map_err(|_| SecretReason::NoRegion)
    }

    /// One signed JSON 1.1 call; the answer's body when it is a success.
    async fn call(
        &self,
        service: Service,
        action: &'static str,
        body: &serde_json::Value,
    ) -> Result<Zeroizing<Vec<u8>>, CallError> {
        let http = self.http.as_ref().ok_or(SecretReason::Unreachable)?;
        let url = self.endpoint(service).await?;
        let region = self.region().await?;
        let identity = self.credentials().await?.into();
        let target = format!("{}.{action}", if service == Service::Ssm { "AmazonSSM" } else { "secretsmanager" });
        let payload = serde_json::to_vec(body).map_err(|_| SecretReason::Signing)?;
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(SecretReason::Signing.into()),
        };
        let headers = [
            ("host", host.as_str()),
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", target.as_str()),
        ];
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&region)
            .name(service.name())
            .time(SystemTime::now())
            .settings(aws_sigv4::http_request::SigningSettings::default())
            .build()
            .map_err(|_| SecretReason::Signing)?
            .into();
        let signable = aws_sigv4::http_request::SignableRequest::new(
            "POST",
            url.as_str(),
            headers.iter().copied(),
            aws_sigv4::http_request::SignableBody::Bytes(&payload),
        )
        .map_err(|_| SecretReason::Signing)?;
        let (instructions, _) =
            aws_sigv4::http_request::sign(signable, &params).map_err(|_| SecretReason::Signing)?.into_parts();
        let (signed_headers, _) = instructions.into_parts();
        // `host` is set by the client from the URL, identically.
        let mut request = http.post(url).header("content-type", headers[1].1).header("x-amz-target", &target);
        for h in &signed_headers {
            request = request.header(h.name(), h.value());
        }
        let mut response = request.body(payload).send().await.map_err(|e| {
            let reason = if e.is_timeout() { SecretReason::Timeout } else { SecretReason::Unreachable };
            // reqwest's error names the URL and the failure, never a body.
            tracing::warn!(target = %target, error = %e, "AWS call failed");
            reason
        })?;
        let status = response.status();
        let header_code = response.headers().get("x-amzn-errortype").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut bytes = Zeroizing::new(Vec::new());
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(SecretReason::TooLarge.into());
                    }
                    if bytes.capacity() < bytes.len() + chunk.len() {
                        // Grown by hand so no unwiped copy of a value is left in a freed buffer.
                        let mut bigger = Zeroizing::new(Vec::with_capacity((bytes.len() + chunk.len()) * 2));
                        bigger.extend_from_slice(&bytes);
                        bytes = bigger;
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(if e.is_timeout() { SecretReason::Timeout } else { SecretReason::Unreachable }.into());
                }
            }
        }
        if status.is_success() {
            return Ok(bytes);
        }
        let code = error_code(header_code.as_deref(), &bytes);
        tracing::warn!(target = %target, status = status.as_u16(), code = %code, "AWS answered with an error");
        Err(CallError::Aws { status: status.as_u16(), code })
    }

    /// `DescribeSecret`: present with `LastChangedDate`, or missing when unknown to AWS or
    /// scheduled for deletion.
    pub(super) async fn secret_existence(&self, id: &str) -> Result<Option<Timestamp>, SecretReason> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Out {
            last_changed_date: Option<f64>,
            created_date: Option<f64>,
            deleted_date: Option<f64>,
        }
        let body = self
            .call(Service::SecretsManager, "DescribeSecret", &serde_json::json!({ "SecretId": id }))
            .await
            .map_err(|e| e.reason(&["ResourceNotFoundException"]))?;
        let out: Out = serde_json::from_slice(&body).map_err(|_| SecretReason::BadResponse)?;
        if out.deleted_date.is_some() {
            return Err(SecretReason::ScheduledForDeletion);
        }
        Ok(out.last_changed_date.or(out.created_date).and_then(epoch_seconds))
    }

    /// `DescribeParameters` filtered on the exact name: present with `LastModifiedDate`, or
    /// missing when no page lists it.
    pub(super) async fn parameter_existence(&self, name: &str) -> Result<Option<Timestamp>, SecretReason> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Param {
            name: String,
            last_modified_date: Option<f64>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Out {
            #[serde(default)]
            parameters: Vec<Param>,
            next_token: Option<String>,
        }
        let mut next_token: Option<String> = None;
        for _ in 0..MAX_PARAMETER_PAGES {
            let mut request = serde_json::json!({
                "ParameterFilters": [{ "Key": "Name", "Option": "Equals", "Values": [name] }],
            });
            if let Some(token) = &next_token {
                request["NextToken"] = token.clone().into();
            }
            let body = self
                .call(Service::Ssm, "DescribeParameters", &request)
                .await
                .map_err(|e| e.reason(&["ParameterNotFound"]))?;
            let out: Out = serde_json::from_slice(&body).map_err(|_| SecretReason::BadResponse)?;
            if let Some(p) = out.parameters.iter().find(|p| p.name == name) {
                return Ok(p.last_modified_date.and_then(epoch_seconds));
            }
            match out.next_token.filter(|t| !t.is_empty()) {
                Some(token) => next_token = Some(token),
                None => return Err(SecretReason::NotFound),
            }
        }
        Err(SecretReason::BadResponse)
    }

    /// `GetSecretValue`: `SecretString`, or `SecretBinary` as its base64 text.
    pub(super) async fn secret_value(&self, id: &str) -> Result<SecretValue, SecretReason> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Out {
            secret_string: Option<Zeroizing<String>>,
            secret_binary: Option<Zeroizing<String>>,
        }
        let body = self
            .call(Service::SecretsManager, "GetSecretValue", &serde_json::json!({ "SecretId": id }))
            .await
            .map_err(|e| e.reason(&["ResourceNotFoundException"]))?;
        let out: Out = serde_json::from_slice(&body).map_err(|_| SecretReason::BadResponse)?;
        out.secret_string.or(out.secret_binary).ok_or(SecretReason::BadResponse)
    }

    /// `GetParameter` with decryption, so a `SecureString` comes back in clear.
    pub(super) async fn parameter_value(&self, name: &str) -> Result<SecretValue, SecretReason> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Param {
            value: Zeroizing<String>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Out {
            parameter: Param,
        }
        let body = self
            .call(Service::Ssm, "GetParameter", &serde_json::json!({ "Name": name, "WithDecryption": true }))
            .await
            .map_err(|e| e.reason(&["ParameterNotFound"]))?;
        let out: Out = serde_json::from_slice(&body).map_err(|_| SecretReason::BadResponse)?;
        Ok(out.parameter.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_sanitised_error_code_survives_an_error_answer() {
        let body =
            br#"{"__type":"com.amazonaws.secretsmanager#ResourceNotFoundException","message":"the value hunter2"}"#;
        assert_eq!(error_code(None, body), "ResourceNotFoundException");
        assert_eq!(error_code(Some("AccessDeniedException:http://internal/"), b"hunter2"), "AccessDeniedException");
        assert_eq!(error_code(None, b"<html>hunter2</html>"), "");
        assert_eq!(error_code(None, br#"{"__type":"a b\nc<script>"}"#), "abcscript");
        let aws = |status, code: &str| CallError::Aws { status, code: code.to_owned() };
        assert_eq!(
            aws(400, "ResourceNotFoundException").reason(&["ResourceNotFoundException"]),
            SecretReason::NotFound
        );
        assert_eq!(aws(400, "ParameterNotFound").reason(&["ResourceNotFoundException"]), SecretReason::ServiceError);
        assert_eq!(aws(400, "UnrecognizedClientException").reason(&[]), SecretReason::AccessDenied);
        assert_eq!(aws(403, "").reason(&[]), SecretReason::AccessDenied);
        assert_eq!(aws(500, "InternalServiceError").reason(&[]), SecretReason::ServiceError);
        assert_eq!(aws(400, "ThrottlingException").reason(&[]), SecretReason::ServiceError);
    }

    #[test]
    fn timestamps_are_epoch_seconds_and_endpoints_are_plain_urls() {
        assert_eq!(epoch_seconds(1_700_000_000.123), Some(Timestamp::from_unix_millis(1_700_000_000_123)));
        assert_eq!(epoch_seconds(f64::NAN), None);
        assert_eq!(epoch_seconds(1e300), None);
        assert!("http://127.0.0.1:4566".parse::<AwsEndpoint>().is_ok());
        assert!("https://secretsmanager.eu-west-1.amazonaws.com/".parse::<AwsEndpoint>().is_ok());
        for bad in ["127.0.0.1:4566", "file:///x", "http://u:p@h/", "http://h/?a=b", "http://h/#f"] {
            assert!(bad.parse::<AwsEndpoint>().is_err(), "{bad}");
        }
    }
}
