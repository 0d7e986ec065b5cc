"""An independent check of ztid access tokens with PyJWT, from the metadata and JWKS alone.

Usage: sts_verify.py --issuer URL --bundle PEM --audience AUD TOKEN...
Prints one JSON line: {"results": [{"ok": true, "header": …, "claims": …} or
{"ok": false, "error": …}, …], "metadata": …}.

Nothing but the issuer URL and the trust bundle (the CA of the HTTPS endpoint) is
configured: the JWKS URI comes from RFC 8414 metadata at
`<issuer>/.well-known/oauth-authorization-server`; the signature (ES256 only), `iss`,
`aud`, `exp` and the RFC 9068 header type `at+jwt` are checked.
"""
import argparse
import json
import ssl
import urllib.request

import jwt

REQUIRED = ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"]


class Verifier:
    """Verifies tokens of one issuer, discovering its keys from its metadata."""

    def __init__(self, issuer: str, bundle: str):
        self.issuer = issuer
        self.ctx = ssl.create_default_context(cafile=bundle)
        url = issuer.rstrip("/") + "/.well-known/oauth-authorization-server"
        with urllib.request.urlopen(url, context=self.ctx, timeout=20) as r:
            self.metadata = json.loads(r.read())
        if self.metadata.get("issuer") != issuer:
            raise ValueError(f"metadata names issuer {self.metadata.get('issuer')!r}, not {issuer!r}")
        self.jwks = jwt.PyJWKClient(self.metadata["jwks_uri"], ssl_context=self.ctx, cache_jwk_set=False)

    def verify(self, token: str, audience: str) -> dict:
        """The header and claims of a valid token; raises on any failure."""
        key = self.jwks.get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token,
            key.key,
            algorithms=["ES256"],
            audience=audience,
            issuer=self.issuer,
            options={"require": REQUIRED},
        )
        header = jwt.get_unverified_header(token)  # signed: verified by the decode above
        if header.get("typ") != "at+jwt":
            raise jwt.InvalidTokenError(f"typ is {header.get('typ')!r}, not 'at+jwt' (RFC 9068)")
        return {"header": header, "claims": claims}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--audience", required=True)
    ap.add_argument("tokens", nargs="+")
    args = ap.parse_args()
    v = Verifier(args.issuer, args.bundle)
    results = []
    for t in args.tokens:
        try:
            results.append({"ok": True, **v.verify(t, args.audience)})
        except Exception as e:  # noqa: BLE001 - each refusal is a result
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
    print(json.dumps({"metadata": v.metadata, "results": results}), flush=True)


if __name__ == "__main__":
    main()
