// A real OpenID provider (npm oidc-provider) for Custody's end-to-end tests.
//
//   node server.mjs --port PORT [--audience urn:custody] [--agent-secret S]
//
// Clients: `agent-ci` (client credentials, group ai-agents), `ops-bot` (client
// credentials, group custody-admins, same secret) and `custody-cli`
// (device flow, public). Any login name works in the dev interaction form;
// alice, bob and admin get groups. Access tokens are RFC 9068 JWTs (RS256).
// Test-only control endpoint: POST /__test/rotate replaces the signing key.
import http from 'node:http';
import { generateKeyPair, exportJWK } from 'jose';
import Provider from 'oidc-provider';

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const port = Number(arg('port', '4011'));
const audience = arg('audience', 'urn:custody');
const agentSecret = arg('agent-secret', 'agent-ci-secret-for-tests');
const issuer = `http://127.0.0.1:${port}`;

const accountGroups = { alice: ['engineers'], bob: ['approvers'], admin: ['custody-admins'] };
const clientGroups = { 'agent-ci': ['ai-agents'], 'ops-bot': ['custody-admins'] };

async function newKey() {
  const { privateKey } = await generateKeyPair('RS256', { extractable: true });
  const jwk = await exportJWK(privateKey);
  jwk.kid = `k-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  jwk.alg = 'RS256';
  jwk.use = 'sig';
  return jwk;
}

let keys = [await newKey()];

function makeProvider() {
  const p = new Provider(issuer, {
    clients: [
      { client_id: 'agent-ci', client_secret: agentSecret, grant_types: ['client_credentials'],
        redirect_uris: [], response_types: [] },
      { client_id: 'ops-bot', client_secret: agentSecret, grant_types: ['client_credentials'],
        redirect_uris: [], response_types: [] },
      { client_id: 'custody-cli', grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
        redirect_uris: [], response_types: [], token_endpoint_auth_method: 'none' },
    ],
    jwks: { keys },
    features: {
      clientCredentials: { enabled: true },
      deviceFlow: { enabled: true },
      devInteractions: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => audience,
        getResourceServerInfo: () => ({ scope: 'openid offline_access', audience,
          accessTokenFormat: 'jwt', jwt: { sign: { alg: 'RS256' } } }),
        useGrantedResource: () => true,
      },
    },
    scopes: ['openid', 'offline_access'],
    findAccount: async (ctx, id) => ({
      accountId: id,
      claims: async () => ({ sub: id, email: `${id}@example.test`, groups: accountGroups[id] ?? [] }),
    }),
    extraTokenClaims: async (ctx, token) => {
      if (token.accountId) {
        return { groups: accountGroups[token.accountId] ?? [], email: `${token.accountId}@example.test` };
      }
      return { groups: clientGroups[token.clientId] ?? [] };
    },
    // Device-flow logins issue refresh tokens too.
    issueRefreshToken: async () => true,
  });
  p.on('server_error', (ctx, err) => console.error('server_error', err));
  return p;
}

let provider = makeProvider();

const server = http.createServer(async (req, res) => {
  if (req.method === 'POST' && req.url === '/__test/rotate') {
    keys = [await newKey()];
    provider = makeProvider();
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ kid: keys[0].kid }));
    return;
  }
  provider.callback()(req, res);
});
server.listen(port, '127.0.0.1', () => console.log(`oidc-provider ready on ${issuer}`));
