// A real OpenID Provider for radtriage's single sign-on tests: panva/oidc-provider (OpenID
// Certified), on loopback, with static clients and test accounts whose "roles" claim the
// relying party maps to its roles. Sign-in uses the library's development interactions (any
// password; the account is the login name), consent is granted for the registered clients.
//
//   node provider.mjs CONFIG.json    (prints "listening <issuer>" once it accepts connections)
//
// CONFIG: {"issuer": "http://localhost:PORT", "host": "127.0.0.1", "port": PORT,
//          "clients": [{client_id, client_secret?, redirect_uris, post_logout_redirect_uris}],
//          "accounts": {"rita": {"roles": ["radtriage-radiologist"], "name": "Rita R"}},
//          "id_token_ttl_s": {"client_id": seconds}}
import { readFileSync } from "node:fs";
import Provider from "oidc-provider";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const accounts = config.accounts || {};
const ttls = config.id_token_ttl_s || {};

const provider = new Provider(config.issuer, {
  clients: config.clients.map((c) => ({
    grant_types: ["authorization_code"],
    response_types: ["code"],
    token_endpoint_auth_method: c.client_secret ? "client_secret_basic" : "none",
    ...c,
  })),
  pkce: { required: () => true },
  cookies: { keys: ["radtriage-test-cookie-key-not-secret"] },
  conformIdTokenClaims: false, // scope claims (roles, preferred_username) in the ID token
  claims: {
    openid: ["sub"],
    profile: ["preferred_username", "name", "roles"],
    email: ["email"],
  },
  features: { devInteractions: { enabled: true }, rpInitiatedLogout: { enabled: true } },
  ttl: {
    IdToken: (ctx, token, client) => ttls[client.clientId] ?? 3600,
  },
  async findAccount(ctx, sub) {
    const account = accounts[sub];
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          preferred_username: sub,
          name: account?.name ?? sub,
          email: `${sub}@hospital.test`,
          roles: account?.roles ?? [],
        };
      },
    };
  },
  // first-party clients: grant what they ask for, no consent page
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope(ctx.oidc.params.scope);
    await grant.save();
    return grant;
  },
});

provider.listen(config.port, config.host || "127.0.0.1", () => {
  console.log(`listening ${config.issuer}`);
});
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => process.exit(0));
