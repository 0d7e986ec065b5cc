"""A resource server that honours sender-constrained tokens (RFC 8705 §3).

Usage: sts_bound_resource.py --issuer URL --bundle PEM [--dir DIR]

Serves HTTPS on 127.0.0.1 (a port the kernel picks) with a self-signed certificate it
makes for itself, asks every client for a certificate chaining to the ztid bundle, and
accepts a
request only when its bearer token verifies (PyJWT, from ztid's metadata and JWKS
alone, `aud` = this resource's URL) and the token's `cnf.x5t#S256` equals the
base64url SHA-256 of the DER of the client certificate of this very connection.
Answers JSON: 200 {"sub", "client_id"} or 401 {"error", "reason"}.

Prints `{"listening": URL, "ca": PEM-file}` once listening: URL is also the audience
tokens must carry, and the PEM file the CA its clients must trust.
"""
import argparse
import base64
import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import ssl
import sys
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # no __pycache__ left in the checkout
from sts_verify import Verifier  # noqa: E402


def self_signed(directory: str) -> tuple:
    """A throwaway certificate for 127.0.0.1: this server's own TLS identity."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bound-resource")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


def thumbprint(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--bundle", required=True, help="ztid trust bundle: CA of the token endpoint and of clients")
    ap.add_argument("--dir", help="where to write its certificate and key (default: a new temporary directory)")
    args = ap.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="bound-resource-")
    cert_path, key_path = self_signed(directory)
    verifier = Verifier(args.issuer, args.bundle)
    state = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, status: int, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def refuse(self, reason: str) -> None:
            self.answer(401, {"error": "invalid_token", "reason": reason})

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return self.refuse("no bearer token")
            try:
                claims = verifier.verify(auth[len("Bearer "):], state["url"])["claims"]
            except Exception as e:  # noqa: BLE001
                return self.refuse(f"token invalid: {type(e).__name__}: {e}")
            bound_to = (claims.get("cnf") or {}).get("x5t#S256")
            if not bound_to:
                return self.refuse("token is not sender-constrained (no cnf x5t#S256)")
            peer = self.connection.getpeercert(binary_form=True)
            if not peer:
                return self.refuse("no client certificate on this connection, token is bound to one")
            if thumbprint(peer) != bound_to:
                return self.refuse("client certificate does not match the token's cnf x5t#S256")
            self.answer(200, {"sub": claims["sub"], "client_id": claims["client_id"]})

        def log_message(self, fmt, *a):  # noqa: D401 - quieter stderr
            sys.stderr.write("bound-resource: " + (fmt % a) + "\n")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cafile=args.bundle)
    # Optional at the TLS layer so a request without a certificate gets a reason, not a
    # handshake failure; the handler refuses it.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    state["url"] = f"https://127.0.0.1:{server.server_port}/notes"
    print(json.dumps({"listening": state["url"], "ca": cert_path}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
