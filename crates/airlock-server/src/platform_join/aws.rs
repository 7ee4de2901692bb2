//! AWS join: a SigV4-signed `sts:GetCallerIdentity` request, checked, then forwarded to STS.
//!
//! The appliance signs the request with its own AWS credentials; the control plane never
//! sees them, and cannot change a byte of the request without AWS refusing the signature.
//! Before forwarding, [`check_proof`] decides, without I/O, whether the request is one the
//! control plane may send: the exact `GetCallerIdentity` body, `POST` to `/` of an endpoint on
//! the allow list ([`StsAllowList`]: the public STS endpoints by default, never an arbitrary
//! URL), an `sts` credential scope, and signed headers that cover `host`, the challenge and
//! this control plane's id, whose values it checks, and the tenant and environment the appliance
//! named if it sent them ([`TENANT_HEADER`], [`ENVIRONMENT_HEADER`]; [`check_tenant`] and
//! [`check_environment`] hold them to the join's). [`StsClient::call`] then sends it, with no
//! redirect followed, a time limit and a cap on the answer's size, and reads `Account` and
//! `Arn` from AWS's answer.

use std::collections::BTreeMap;
use std::time::Duration;

use airlock_core::{EnvironmentId, TenantId};
use airlock_proto::join::{
    AwsStsProof, CHALLENGE_HEADER, ENVIRONMENT_HEADER, GET_CALLER_IDENTITY_BODY, SERVER_ID_HEADER, TENANT_HEADER,
};
use reqwest::Url;

use super::rules::AwsIdentity;

/// How long STS has to answer.
pub const STS_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of STS's answer read (a `GetCallerIdentity` answer is under 1 KiB).
pub const MAX_STS_RESPONSE_BYTES: usize = 64 * 1024;
/// Headers a proof may carry, and the most bytes of any one value (a session token is a few KiB).
const MAX_HEADERS: usize = 16;
const MAX_HEADER_VALUE_BYTES: usize = 8 * 1024;

/// Where proofs may be sent: `https://sts.amazonaws.com` and `https://sts.<region>.amazonaws.com`
/// by default, or exactly the configured origins (`--aws-sts-endpoint`), which replace them.
#[derive(Clone, Debug, Default)]
pub struct StsAllowList {
    /// Configured origins (`scheme://host[:port]`); empty: the public endpoints.
    origins: Vec<String>,
}

impl StsAllowList {
    /// The configured endpoints, each an `http(s)://HOST[:PORT][/]` URL.
    pub fn new(endpoints: &[String]) -> Result<Self, String> {
        let origins = endpoints
            .iter()
            .map(|e| {
                let url = Url::parse(e).map_err(|err| format!("--aws-sts-endpoint `{e}`: {err}"))?;
                let plain = matches!(url.scheme(), "http" | "https")
                    && url.host_str().is_some()
                    && url.username().is_empty()
                    && url.password().is_none()
                    && url.path() == "/"
                    && url.query().is_none()
                    && url.fragment().is_none();
                if !plain {
                    return Err(format!("--aws-sts-endpoint `{e}`: an endpoint is http(s)://HOST[:PORT]"));
                }
                Ok(url.origin().ascii_serialization())
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { origins })
    }

    /// Whether `url` is an allowed endpoint (its path and query checked by the caller).
    fn allows(&self, url: &Url) -> bool {
        if !self.origins.is_empty() {
            return self.origins.contains(&url.origin().ascii_serialization());
        }
        let Some(host) = url.host_str() else { return false };
        let regional =
            host.strip_prefix("sts.").and_then(|h| h.strip_suffix(".amazonaws.com")).is_some_and(is_region_name);
        url.scheme() == "https" && url.port().is_none() && (host == "sts.amazonaws.com" || regional)
    }
}

/// Whether `label` has the shape of an AWS region's name (`us-east-1`, `ap-southeast-2`,
/// `us-gov-west-1`): two letters, dash-separated words, a number. Any label would also let
/// `sts.s3.amazonaws.com` through, an S3 bucket's host, not STS.
fn is_region_name(label: &str) -> bool {
    let mut parts = label.split('-');
    let country = parts.next().is_some_and(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_lowercase()));
    let parts: Vec<&str> = parts.collect();
    let Some((number, words)) = parts.split_last() else { return false };
    country
        && label.len() <= 32
        && !words.is_empty()
        && words.iter().all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        && (1..=2).contains(&number.len())
        && number.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a proof may sign header `name`: what a SigV4 `GetCallerIdentity` request needs, and
/// ours. STS reads other signed headers too (`x-amz-target` switches it to another protocol;
/// `expect` and `transfer-encoding` change the framing), so a proof signing any other is refused
/// rather than forwarded.
fn forwardable(name: &str) -> bool {
    matches!(
        name,
        "host" | "content-type" | "content-length" | "x-amz-date" | "x-amz-security-token" | "x-amz-content-sha256"
    ) || name.starts_with("x-airlock-")
}

/// The content types of a form-encoded query request, as SDKs send them.
fn form_content_type(value: &str) -> bool {
    let value = value.to_ascii_lowercase();
    let value = value.trim();
    value == "application/x-www-form-urlencoded" || value == "application/x-www-form-urlencoded; charset=utf-8"
}

/// Why a proof was refused, as a code (audited and answered) with a reason for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AwsRefusal {
    /// Not a well-formed `GetCallerIdentity` request (method, body, headers, authorization).
    Malformed(String),
    /// The URL is not an allow-listed STS endpoint.
    EndpointNotAllowed(String),
    /// A header the control plane requires is not among the signed headers.
    UnsignedHeader(&'static str),
    /// The signed server id is another control plane's.
    OtherServer,
    /// The join names an environment that the proof does not sign.
    EnvironmentUnsigned(EnvironmentId),
    /// The proof signs one environment and the join names another.
    OtherEnvironment { signed: EnvironmentId, named: EnvironmentId },
    /// The join names a tenant that the proof does not sign.
    TenantUnsigned(TenantId),
    /// The proof signs one tenant and the join names another.
    OtherTenant { signed: TenantId, named: TenantId },
    /// STS refused the signature or the credentials (its error code).
    StsRefused(String),
    /// STS could not be reached in time.
    StsUnreachable,
    /// STS answered something that is not a `GetCallerIdentity` result.
    StsBadAnswer,
}

impl AwsRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_proof",
            Self::EndpointNotAllowed(_) => "endpoint_not_allowed",
            Self::UnsignedHeader(_) => "unsigned_header",
            Self::OtherServer => "other_server",
            Self::EnvironmentUnsigned(_) => "environment_unsigned",
            Self::OtherEnvironment { .. } => "environment_mismatch",
            Self::TenantUnsigned(_) => "tenant_unsigned",
            Self::OtherTenant { .. } => "tenant_mismatch",
            Self::StsRefused(_) => "sts_refused",
            Self::StsUnreachable => "sts_unreachable",
            Self::StsBadAnswer => "sts_bad_answer",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Self::Malformed(why) => format!("the AWS proof is malformed: {why}"),
            Self::EndpointNotAllowed(url) => format!(
                "the AWS proof is addressed to {url}, which is not an STS endpoint this control plane sends to; sign for https://sts.<region>.amazonaws.com"
            ),
            Self::UnsignedHeader(h) => format!("the AWS proof does not sign the `{h}` header"),
            Self::OtherServer => {
                "the AWS proof was made for another control plane (its x-airlock-server-id is not this CA's fingerprint)".into()
            }
            Self::EnvironmentUnsigned(named) => format!(
                "the join names environment {named}, but its AWS proof does not sign it (the `{ENVIRONMENT_HEADER}` header)"
            ),
            Self::OtherEnvironment { signed, named } => format!(
                "the AWS proof was signed for environment {signed}, but the join names environment {named}"
            ),
            Self::TenantUnsigned(named) => {
                format!("the join names tenant {named}, but its AWS proof does not sign it (the `{TENANT_HEADER}` header)")
            }
            Self::OtherTenant { signed, named } => {
                format!("the AWS proof was signed for tenant {signed}, but the join names tenant {named}")
            }
            Self::StsRefused(code) => format!("AWS STS refused the signed request ({code})"),
            Self::StsUnreachable => "AWS STS could not be reached in time; try again".into(),
            Self::StsBadAnswer => "AWS STS answered something that is not a GetCallerIdentity result".into(),
        }
    }
}

/// A proof that may be sent: its URL allowed, its challenge to spend.
#[derive(Debug)]
pub struct CheckedProof {
    url: Url,
    /// Headers to send (lowercase names), `host` and `content-length` left to the client.
    headers: Vec<(String, String)>,
    /// The challenge the signed header carries.
    pub challenge: String,
    /// The environment the signed [`ENVIRONMENT_HEADER`] names, if the proof signs one.
    pub environment: Option<EnvironmentId>,
    /// The tenant the signed [`TENANT_HEADER`] names, if the proof signs one.
    pub tenant: Option<TenantId>,
}

/// The checks made before anything is sent; `server_id` is this control plane's CA fingerprint.
pub fn check_proof(proof: &AwsStsProof, allow: &StsAllowList, server_id: &str) -> Result<CheckedProof, AwsRefusal> {
    let malformed = |why: &str| AwsRefusal::Malformed(why.to_owned());
    if proof.method != "POST" {
        return Err(malformed("the method must be POST"));
    }
    let url = Url::parse(&proof.url).map_err(|_| malformed("the URL does not parse"))?;
    if !allow.allows(&url) || !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err(AwsRefusal::EndpointNotAllowed(url.origin().ascii_serialization()));
    }
    if url.path() != "/" || url.query().is_some() {
        return Err(malformed("the URL must be the endpoint's `/`, with no query"));
    }
    if proof.body != GET_CALLER_IDENTITY_BODY {
        return Err(malformed("the body must be `Action=GetCallerIdentity&Version=2011-06-15`"));
    }
    if proof.headers.len() > MAX_HEADERS {
        return Err(malformed("too many headers"));
    }
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &proof.headers {
        let lower = name.to_ascii_lowercase();
        let token = !lower.is_empty() && lower.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let printable =
            value.len() <= MAX_HEADER_VALUE_BYTES && value.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
        if !token || !printable {
            return Err(malformed("a header name or value is not plain text"));
        }
        if headers.insert(lower, value.clone()).is_some() {
            return Err(malformed("a header is given twice"));
        }
    }
    let authorization = headers.get("authorization").ok_or_else(|| malformed("no authorization header"))?;
    let auth = parse_authorization(authorization).ok_or_else(|| malformed("the authorization header is not SigV4"))?;
    if auth.service != "sts" {
        return Err(malformed("the credential scope is not for sts"));
    }
    if let Some(other) = auth.signed_headers.iter().find(|h| !forwardable(h)) {
        // The name is the caller's: shown only as far as it is a plain header name.
        let shown: String = other.chars().take(64).filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        return Err(AwsRefusal::Malformed(format!(
            "it signs the `{shown}` header, which a GetCallerIdentity request does not need"
        )));
    }
    if headers.get("content-type").is_some_and(|t| !form_content_type(t)) {
        return Err(malformed("the content type must be application/x-www-form-urlencoded"));
    }
    for required in ["host", CHALLENGE_HEADER, SERVER_ID_HEADER] {
        if !auth.signed_headers.iter().any(|h| h == required) {
            return Err(AwsRefusal::UnsignedHeader(required));
        }
    }
    // The host that was signed must be the one the request goes to, or AWS would refuse it anyway.
    let authority = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        (None, _) => return Err(malformed("the URL has no host")),
    };
    if headers.get("host").is_some_and(|h| *h != authority) {
        return Err(malformed("the signed host is not the URL's"));
    }
    if headers.get(SERVER_ID_HEADER).map(String::as_str) != Some(server_id) {
        return Err(AwsRefusal::OtherServer);
    }
    let challenge = headers.get(CHALLENGE_HEADER).cloned().ok_or(AwsRefusal::UnsignedHeader(CHALLENGE_HEADER))?;
    // Sent but not signed, the environment would be anyone's to change: refused rather than ignored.
    let environment = match headers.get(ENVIRONMENT_HEADER) {
        None => None,
        Some(_) if !auth.signed_headers.iter().any(|h| h == ENVIRONMENT_HEADER) => {
            return Err(AwsRefusal::UnsignedHeader(ENVIRONMENT_HEADER));
        }
        Some(env) => Some(
            env.parse::<EnvironmentId>()
                .map_err(|_| malformed("the signed environment is not an environment id (`env_…`)"))?,
        ),
    };
    let tenant = match headers.get(TENANT_HEADER) {
        None => None,
        Some(_) if !auth.signed_headers.iter().any(|h| h == TENANT_HEADER) => {
            return Err(AwsRefusal::UnsignedHeader(TENANT_HEADER));
        }
        Some(t) => {
            Some(t.parse::<TenantId>().map_err(|_| malformed("the signed tenant is not a tenant id (`ten_…`)"))?)
        }
    };
    // Only what AWS reads: the signed headers and the signature. Framing is the client's.
    let send: Vec<(String, String)> = headers
        .into_iter()
        .filter(|(n, _)| n == "authorization" || auth.signed_headers.contains(n))
        .filter(|(n, _)| n != "host" && n != "content-length")
        .collect();
    Ok(CheckedProof { url, headers: send, challenge, environment, tenant })
}

/// Holds the environment a checked proof signs to the one its join names (`named`): a join that
/// names one must have it signed (when `must_sign`), and the same; a proof that signs one and a
/// join that names another are refused. The environment that then narrows the join's matching.
pub fn check_environment(
    signed: Option<EnvironmentId>,
    named: Option<EnvironmentId>,
    must_sign: bool,
) -> Result<Option<EnvironmentId>, AwsRefusal> {
    match (signed, named) {
        (Some(signed), Some(named)) if signed != named => Err(AwsRefusal::OtherEnvironment { signed, named }),
        (None, Some(named)) if must_sign => Err(AwsRefusal::EnvironmentUnsigned(named)),
        (signed, named) => Ok(signed.or(named)),
    }
}

/// Holds the tenant a checked proof signs to the one its join names, as [`check_environment`] does.
pub fn check_tenant(
    signed: Option<TenantId>,
    named: Option<TenantId>,
    must_sign: bool,
) -> Result<Option<TenantId>, AwsRefusal> {
    match (signed, named) {
        (Some(signed), Some(named)) if signed != named => Err(AwsRefusal::OtherTenant { signed, named }),
        (None, Some(named)) if must_sign => Err(AwsRefusal::TenantUnsigned(named)),
        (signed, named) => Ok(signed.or(named)),
    }
}

struct Authorization {
    service: String,
    signed_headers: Vec<String>,
}

/// `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request, SignedHeaders=a;b, Signature=hex`.
fn parse_authorization(value: &str) -> Option<Authorization> {
    let rest = value.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => signature = Some(v),
            _ => return None,
        }
    }
    let scope: Vec<&str> = credential?.split('/').collect();
    let [_key, _date, _region, service, "aws4_request"] = scope.as_slice() else { return None };
    let signature = signature?;
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let signed_headers = signed?.split(';').map(str::to_owned).collect();
    Some(Authorization { service: (*service).to_owned(), signed_headers })
}

/// Sends checked proofs to STS.
#[derive(Debug, Clone)]
pub struct StsClient {
    http: reqwest::Client,
}

impl StsClient {
    pub fn new(timeout: Duration) -> Result<Self, String> {
        let tls = crate::issuer::outbound_tls(Vec::new())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { http })
    }

    /// Forwards the proof and reads who signed it.
    pub async fn call(&self, proof: &CheckedProof) -> Result<AwsIdentity, AwsRefusal> {
        let mut request = self.http.post(proof.url.clone());
        for (name, value) in &proof.headers {
            request = request.header(name, value);
        }
        let mut response = request.body(GET_CALLER_IDENTITY_BODY).send().await.map_err(|e| {
            tracing::warn!(error = %e, "cannot reach AWS STS to check a join");
            AwsRefusal::StsUnreachable
        })?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|_| AwsRefusal::StsUnreachable)? {
            if body.len() + chunk.len() > MAX_STS_RESPONSE_BYTES {
                return Err(AwsRefusal::StsBadAnswer);
            }
            body.extend_from_slice(&chunk);
        }
        let text = std::str::from_utf8(&body).map_err(|_| AwsRefusal::StsBadAnswer)?;
        if status.is_success() {
            return read_caller_identity(text).ok_or(AwsRefusal::StsBadAnswer);
        }
        if status.is_client_error() {
            return Err(AwsRefusal::StsRefused(
                error_code(text).unwrap_or_else(|| format!("HTTP {}", status.as_u16())),
            ));
        }
        tracing::warn!(status = status.as_u16(), "AWS STS answered a join check with an error");
        Err(AwsRefusal::StsUnreachable)
    }
}

/// `Account` and `Arn` from a `GetCallerIdentityResponse`.
pub fn read_caller_identity(xml: &str) -> Option<AwsIdentity> {
    let mut doc = aws_smithy_xml::decode::Document::new(xml);
    let mut root = doc.root_element().ok()?;
    if !root.start_el().matches("GetCallerIdentityResponse") {
        return None;
    }
    let (mut account, mut arn) = (None, None);
    while let Some(mut tag) = root.next_tag() {
        if !tag.start_el().matches("GetCallerIdentityResult") {
            continue;
        }
        while let Some(mut field) = tag.next_tag() {
            if field.start_el().matches("Account") {
                account = Some(aws_smithy_xml::decode::try_data(&mut field).ok()?.trim().to_owned());
            } else if field.start_el().matches("Arn") {
                arn = Some(aws_smithy_xml::decode::try_data(&mut field).ok()?.trim().to_owned());
            }
        }
    }
    let (account, arn) = (account?, arn?);
    let sane = |s: &str| !s.is_empty() && s.len() <= 2048 && s.bytes().all(|b| b.is_ascii_graphic());
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()) && sane(&arn))
        .then(|| AwsIdentity::from_caller(&account, &arn))
}

/// The `Code` of an STS error answer, letters and digits only.
fn error_code(xml: &str) -> Option<String> {
    let mut doc = aws_smithy_xml::decode::Document::new(xml);
    let mut root = doc.root_element().ok()?;
    while let Some(mut tag) = root.next_tag() {
        if tag.start_el().matches("Error") {
            while let Some(mut field) = tag.next_tag() {
                if field.start_el().matches("Code") {
                    let code = aws_smithy_xml::decode::try_data(&mut field).ok()?;
                    return Some(code.chars().filter(char::is_ascii_alphanumeric).take(64).collect());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
