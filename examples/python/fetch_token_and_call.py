"""An AI agent calls a tool with no static key: SVID -> OAuth token -> HTTP API call.

  pip install spiffe==0.3.2
  python fetch_token_and_call.py https://sts.example.org:8443 https://tools.example.org/api [SCOPE]

The agent's identity comes from the local ztid agent (SPIFFE_ENDPOINT_SOCKET, e.g.
unix:///run/ztid/api.sock); an operator granted it the scope (`ztid-server grant create
--spiffe-id ... --audience https://tools.example.org/api --scope tools.read`).
"""
import json, os, ssl, sys, tempfile, urllib.error, urllib.parse, urllib.request

from cryptography.hazmat.primitives import serialization as ser
from spiffe import WorkloadApiClient

sts, api = sys.argv[1].rstrip("/"), sys.argv[2]
scope = sys.argv[3] if len(sys.argv) > 3 else "tools.read"

# 1. This process's X509-SVID and the trust bundle, from the Workload API (py-spiffe).
with WorkloadApiClient() as client:
    svid = client.fetch_x509_svid()
    bundle = client.fetch_x509_bundles().get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)

# `ssl` loads a client certificate from files: write them where only we can read.
tmp = tempfile.mkdtemp()
cert, key, ca = (os.path.join(tmp, n) for n in ("svid.pem", "key.pem", "ca.pem"))
with open(cert, "wb") as f:
    f.write(b"".join(c.public_bytes(ser.Encoding.PEM) for c in svid.cert_chain))
with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
    f.write(svid.private_key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
with open(ca, "wb") as f:
    f.write(b"".join(c.public_bytes(ser.Encoding.PEM) for c in bundle.x509_authorities))

# 2. Mutual TLS with the SVID; trust only the SPIFFE bundle.
tls = ssl.create_default_context(cafile=ca)
tls.load_cert_chain(cert, key)

# 3. RFC 8693 token exchange: the SVID authenticates us; ask for one resource and scope.
form = urllib.parse.urlencode({
    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
    "resource": api,
    "scope": scope,
}).encode()
try:
    with urllib.request.urlopen(urllib.request.Request(sts + "/token", data=form), context=tls) as r:
        token = json.load(r)["access_token"]  # lives minutes; bound to this SVID (cnf)
except urllib.error.HTTPError as e:
    sys.exit(f"refused: {json.load(e)}")  # {"error": "invalid_scope", "error_description": ...}

# 4. Call the API (its certificate checked against the system CAs) with the bearer token,
#    presenting the same SVID: a resource that checks the binding (RFC 8705) sees the key.
api_tls = ssl.create_default_context()
api_tls.load_cert_chain(cert, key)
req = urllib.request.Request(api, headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(req, context=api_tls) as r:
    print(r.status, r.read().decode())
