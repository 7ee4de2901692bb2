// A real OpenID provider for Airlock's tests: panva's certified `oidc-provider`, configured here and
// started by the Rust harness (`airlock_testkit::oidc`). Only the login screen is ours: instead of
// an HTML form, `/interaction/:uid` logs in the account the test chose for the next login, so a
// login is driven by following redirects. Authorize, token, JWKS, discovery and end_session are
// the library's own endpoints, unchanged.
//
// Usage: node provider.mjs CONFIG.json, with OIDC_PROVIDER_DIR naming the folder `npm ci`
// installed oidc-provider into (scripts/test does that). CONFIG holds:
//   cert, key:   PEM files for HTTPS on 127.0.0.1 (the harness makes a test CA and this leaf)
//   accounts:    a JSON file, re-read at every login and token, of the form
//                { "accounts": { "<sub>": { "email", "groups": [..], "amr": [..], "acr",
//                                           "authenticated_seconds_ago"? } },
//                  "next_login": "<sub>" | null }   (null: the user refuses, access_denied)
//   clients:     [{ client_id, client_secret, redirect_uris, post_logout_redirect_uris?,
//                   id_token_signed_response_alg? (RS256 | ES256), token_endpoint_auth_method? }]
//   id_token_ttl_seconds?: the lifetime of an ID token (default 3600)
// It prints one JSON line on stdout, {"issuer": "https://127.0.0.1:<port>"}, once it listens,
// and exits when its stdin closes, so a test that dies leaves no provider behind.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const dir = process.env.OIDC_PROVIDER_DIR;
if (!dir) {
  console.error('OIDC_PROVIDER_DIR is not set: it names the folder scripts/test installs oidc-provider into');
  process.exit(2);
}
const { default: Provider } = await import(
  pathToFileURL(join(dir, 'node_modules', 'oidc-provider', 'lib', 'index.js')).href
);

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

function readAccounts() {
  return JSON.parse(readFileSync(config.accounts, 'utf8'));
}

// Fresh signing keys at every start: one RSA (RS256, the default) and one P-256 (ES256).
function signingKey(type, options, kid) {
  const { privateKey } = generateKeyPairSync(type, options);
  return { ...privateKey.export({ format: 'jwk' }), kid, use: 'sig' };
}
const jwks = {
  keys: [
    signingKey('rsa', { modulusLength: 2048 }, `rsa-${randomBytes(4).toString('hex')}`),
    signingKey('ec', { namedCurve: 'P-256' }, `ec-${randomBytes(4).toString('hex')}`),
  ],
};

// The port is known only once the socket is bound, and the issuer (which names it) is needed to
// build the provider: listen first, then attach the handler.
const server = createServer({ cert: readFileSync(config.cert), key: readFileSync(config.key) });
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `https://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: config.clients.map((c) => ({
    response_types: ['code'],
    grant_types: ['authorization_code'],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: 'RS256',
    // auth_time in every ID token, so the relying party can check step-up against it.
    require_auth_time: true,
    ...c,
  })),
  jwks,
  cookies: { keys: [randomBytes(32).toString('hex')] },
  // Code flow only, and PKCE (S256) required of every client.
  responseTypes: ['code'],
  pkce: { methods: ['S256'], required: () => true },
  scopes: ['openid', 'email', 'profile', 'groups', 'offline_access'],
  // `groups` comes with `openid` too, as with identity providers that always send it; so do the
  // login's `acr` and `amr`, which the library leaves out unless a scope names them.
  claims: {
    openid: ['sub', 'groups', 'acr', 'amr'],
    email: ['email', 'email_verified'],
    profile: ['name'],
    groups: ['groups'],
  },
  // Claims of the granted scopes go into the ID token itself (not only userinfo): the relying
  // party reads groups, amr and acr from the ID token.
  conformIdTokenClaims: false,
  acrValues: config.acr_values ?? ['urn:airlock:test:pwd', 'urn:airlock:test:mfa'],
  features: { devInteractions: { enabled: false } },
  ttl: {
    AccessToken: 3600,
    AuthorizationCode: 60,
    IdToken: config.id_token_ttl_seconds ?? 3600,
    Interaction: 600,
    Session: 86400,
    Grant: 86400,
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  async findAccount(ctx, sub) {
    const account = readAccounts().accounts?.[sub];
    if (!account) return undefined;
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          email: account.email,
          email_verified: account.email !== undefined,
          name: account.name ?? sub,
          groups: account.groups ?? [],
        };
      },
    };
  },
  renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

// The login screen: logs in the account chosen for the next login, then grants what the client
// asked for. Each step ends with the library's own redirect back into authorize.
async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session } = details;
  let result;
  if (prompt.name === 'login') {
    const { accounts = {}, next_login: sub } = readAccounts();
    if (sub === null || sub === undefined) {
      result = { error: 'access_denied', error_description: 'the user refused to sign in' };
    } else if (!accounts[sub]) {
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(`next_login names ${sub}, which is not in the accounts file`);
      return;
    } else {
      const { amr, acr, authenticated_seconds_ago: ago } = accounts[sub];
      result = { login: { accountId: sub, amr, acr, remember: true } };
      // A provider that backdates the login (its `auth_time`), as one answering from an old sign-in would.
      if (ago) result.login.ts = Math.floor(Date.now() / 1000) - ago;
    }
  } else if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    result = { consent: { grantId: await grant.save() } };
  } else {
    res.writeHead(500, { 'content-type': 'text/plain' });
    res.end(`unexpected prompt ${prompt.name}`);
    return;
  }
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: prompt.name !== 'login' });
}

const callback = provider.callback();
server.on('request', (req, res) => {
  if (req.method === 'GET' && /^\/interaction\/[^/?]+(\?|$)/.test(req.url)) {
    interaction(req, res).catch((err) => {
      console.error('interaction failed', err);
      if (!res.headersSent) res.writeHead(400, { 'content-type': 'text/plain' });
      res.end(`interaction failed: ${err.message}`);
    });
  } else {
    callback(req, res);
  }
});

process.stdout.write(`${JSON.stringify({ issuer })}\n`);
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
process.on('SIGTERM', () => process.exit(0));
