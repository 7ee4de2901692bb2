//! The CLI's HTTPS client for the control plane API, trusting only the pinned CA.

use airlock_core::Fingerprint;
use anyhow::{Context, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub(crate) struct ApiClient {
    base: String,
    token: String,
    pin: Fingerprint,
    http: reqwest::Client,
}

impl ApiClient {
    pub(crate) fn new(base: &str, token: &str, pin: Fingerprint) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(airlock_proto::tls::pinned_client_config(pin))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("building HTTP client")?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), token: token.to_owned(), pin, http })
    }

    /// The control plane CA certificate (DER), checked against the pinned fingerprint: what
    /// signatures the control plane made are verified against it.
    pub(crate) async fn pinned_ca_der(&self) -> anyhow::Result<Vec<u8>> {
        #[derive(serde::Deserialize)]
        struct CaInfo {
            certificate_pem: String,
        }
        let ca: CaInfo = self.get("/v1/ca").await?;
        let der = airlock_core::certificate::pem_to_der(&ca.certificate_pem).context("the control plane's CA")?;
        anyhow::ensure!(
            Fingerprint::of_der(&der) == self.pin,
            "the control plane served a CA certificate other than the pinned one ({}); nothing it signed is trusted",
            self.pin
        );
        Ok(der)
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(self.url(path))).await
    }

    pub(crate) async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub(crate) async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.delete(self.url(path))).await
    }

    pub(crate) async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    /// A GET whose success body is raw bytes (e.g. released operation output).
    pub(crate) async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let resp = self.send_raw(self.http.get(self.url(path))).await?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading response")?;
        if !status.is_success() {
            bail!("{} (HTTP {})", error_message(&String::from_utf8_lossy(&bytes)), status.as_u16());
        }
        Ok(bytes.to_vec())
    }

    /// A GET that answers `None` on 404, e.g. whether the control plane holds an artifact.
    pub(crate) async fn get_opt<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Option<T>> {
        let resp = self.send_raw(self.http.get(self.url(path))).await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let status = resp.status();
        let text = resp.text().await.context("reading response")?;
        if !status.is_success() {
            bail!("{} (HTTP {})", error_message(&text), status.as_u16());
        }
        serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("unexpected response: {}", text.chars().take(200).collect::<String>()))
    }

    /// A PUT of a file's bytes, streamed from the file in pieces, never read whole into memory.
    /// Its deadline grows with the file (a minute plus one per 64 MiB), not the usual 30 s.
    pub(crate) async fn put_file<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &std::path::Path,
        size: u64,
    ) -> anyhow::Result<T> {
        use tokio::io::AsyncReadExt;
        let f = tokio::fs::File::open(file).await.with_context(|| format!("reading {}", file.display()))?;
        let chunks = futures_util::stream::unfold(f, |mut f| async move {
            let mut buf = vec![0u8; 256 * 1024];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok::<_, std::io::Error>(buf), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        });
        let deadline = std::time::Duration::from_secs(60 + size / (64 * 1024 * 1024));
        let req = self
            .http
            .put(self.url(path))
            .timeout(deadline)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(chunks));
        self.send(req).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = self.send_raw(req).await?;
        let status = resp.status();
        let text = resp.text().await.context("reading response")?;
        if !status.is_success() {
            bail!("{} (HTTP {})", error_message(&text), status.as_u16());
        }
        serde_json::from_str(&text)
            .with_context(|| format!("unexpected response: {}", text.chars().take(200).collect::<String>()))
    }

    async fn send_raw(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        req.bearer_auth(&self.token).send().await.map_err(|e| {
            if let Some(pinned) = airlock_proto::tls::find_pin_mismatch(&e) {
                anyhow::anyhow!(
                    "the server at {} does not present the pinned CA {pinned}; check AIRLOCK_CA_FINGERPRINT",
                    self.base
                )
            } else {
                anyhow::anyhow!("cannot reach {}: {}", self.base, airlock_proto::tls::describe_error(&e))
            }
        })
    }
}

/// The message of an API error body, or the body itself.
fn error_message(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.to_owned())
}
