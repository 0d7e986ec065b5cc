"""An AI-agent process against ztid's token endpoint (issue 14), for the e2e tests.

It gets its identity through unmodified py-spiffe from a ztid agent's Workload API,
trades it at the token endpoint (RFC 8693) and uses the token. Every mode prints one
JSON line on stdout for the Rust test; refusals are results (`"ok": false` with the
reason), not crashes. Exit status 0 unless the script itself broke.

  sts_agent.py exchange  --sts URL (--socket EP | --load DIR) [--save DIR]
                         (--resource URL | --audience NAME) [--scope S] [--auth mtls|jwt|assertion]
                         [--may-act ID]
  sts_agent.py call      ... as exchange, plus --mcp URL --tool NAME [--arg k=v]...
                         (or --token T to call with a given token, no exchange)
  sts_agent.py calls     --mcp URL --calls JSON   (several calls, one process)
  sts_agent.py delegate  --sts URL (--socket EP | --load DIR) --subject-token T
                         (--resource URL | --audience NAME) [--scope S] [--actor jwt|mtls]
  sts_agent.py bound     --url URL --server-ca PEM --token T (--socket EP | --load DIR | --no-cert)
                         (calls a resource that checks cnf against its client certificate)
  sts_agent.py svid      --socket EP --save DIR  (fetch and save only)

--save DIR writes the SVID (svid.pem: chain, key.pem, bundle.pem, jwt.txt: a JWT-SVID
for the issuer, id.txt); --load DIR uses such a directory instead of the Workload API,
so a later process can present an instance's credentials again (kill switch, replay).
"""
import argparse
import asyncio
import json
import os
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# How long to wait for the agent to hold an identity for this process.
FETCH_PATIENCE_SECONDS = 30


class Identity:
    """An SVID as files (what `ssl` needs): chain, key, bundle, plus a JWT-SVID."""

    def __init__(self, directory: str):
        self.dir = directory
        self.cert = os.path.join(directory, "svid.pem")
        self.key = os.path.join(directory, "key.pem")
        self.bundle = os.path.join(directory, "bundle.pem")

    def read(self, name: str) -> str:
        with open(os.path.join(self.dir, name)) as f:
            return f.read().strip()

    @property
    def spiffe_id(self) -> str:
        return self.read("id.txt")

    @property
    def jwt(self) -> str:
        return self.read("jwt.txt")


def fetch_identity(endpoint: str, jwt_audience: str, directory: str) -> Identity:
    """X509-SVID, bundle and a JWT-SVID through py-spiffe, written to `directory`."""
    from cryptography.hazmat.primitives import serialization
    from spiffe import WorkloadApiClient

    client = WorkloadApiClient(socket_path=endpoint, default_timeout=20)
    try:
        # An entry made just before this process started reaches the agent at its next
        # sync: until then the agent answers "no identity"; a real agent waits too.
        deadline = time.monotonic() + FETCH_PATIENCE_SECONDS
        while True:
            try:
                svid = client.fetch_x509_svid()
                break
            except Exception:  # noqa: BLE001 - py-spiffe raises its own error types
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        td = svid.spiffe_id.trust_domain
        roots = client.fetch_x509_bundles().get_bundle_for_trust_domain(td).x509_authorities
        jwt = client.fetch_jwt_svid(audience={jwt_audience})
    finally:
        client.close()
    pem = serialization.Encoding.PEM
    os.makedirs(directory, mode=0o700, exist_ok=True)

    def write(name: str, data: bytes) -> None:
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    write("svid.pem", b"".join(c.public_bytes(pem) for c in svid.cert_chain))
    write(
        "key.pem",
        svid.private_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    write("bundle.pem", b"".join(c.public_bytes(pem) for c in roots))
    write("jwt.txt", jwt.token.encode())
    write("id.txt", str(svid.spiffe_id).encode())
    return Identity(directory)


def identity(args) -> Identity:
    if args.load:
        return Identity(args.load)
    directory = args.save or tempfile.mkdtemp(prefix="sts-agent-")
    return fetch_identity(args.socket, args.sts, directory)


def tls(ident: Identity, client_cert: bool = True, server_ca: str = None) -> ssl.SSLContext:
    """Trusts the ztid bundle only (or `server_ca`); presents the X509-SVID when `client_cert`."""
    ctx = ssl.create_default_context(cafile=server_ca or ident.bundle)
    if client_cert:
        ctx.load_cert_chain(ident.cert, ident.key)
    return ctx


def post_form(url: str, form: dict, ctx: ssl.SSLContext) -> dict:
    """POSTs a form; answers {status, body} whatever the status."""
    data = urllib.parse.urlencode(form).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=20) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"raw": raw.decode(errors="replace")}
    return {"status": status, "body": body}


def target(args) -> dict:
    if args.resource:
        return {"resource": args.resource}
    return {"audience": args.audience}


def exchange(args, ident: Identity) -> dict:
    """Exchanges the caller's own SVID (mTLS, JWT-SVID subject_token or assertion)."""
    form = {"grant_type": TOKEN_EXCHANGE, **target(args)}
    if args.scope:
        form["scope"] = args.scope
    if args.may_act:
        form["may_act"] = args.may_act
    auth = args.auth
    if auth == "mtls":
        ctx = tls(ident)
    else:
        ctx = tls(ident, client_cert=False)
        if auth == "jwt":
            form["subject_token"] = ident.jwt
            form["subject_token_type"] = JWT_TYPE
        else:
            form["client_assertion"] = ident.jwt
            form["client_assertion_type"] = JWT_BEARER
    answer = post_form(args.sts.rstrip("/") + "/token", form, ctx)
    return result(answer, ident)


def delegate(args, ident: Identity) -> dict:
    """Acts for a subject: its access token, and this process's own identity as actor."""
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": args.subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        **target(args),
    }
    if args.scope:
        form["scope"] = args.scope
    if args.actor == "jwt":
        form["actor_token"] = ident.jwt
        form["actor_token_type"] = JWT_TYPE
        ctx = tls(ident, client_cert=False)
    else:
        ctx = tls(ident)
    answer = post_form(args.sts.rstrip("/") + "/token", form, ctx)
    return result(answer, ident)


def result(answer: dict, ident: Identity) -> dict:
    body = answer["body"]
    out = {"spiffe_id": ident.spiffe_id, "status": answer["status"], "response": body}
    out["ok"] = answer["status"] == 200 and "access_token" in body
    if not out["ok"]:
        out["error"] = body.get("error")
        out["error_description"] = body.get("error_description")
    return out


class RecordingBearer:
    """Bearer auth for the FastMCP client that also records an HTTP refusal."""

    def __init__(self, token: str):
        import httpx2

        outer = self
        self.refusal = None

        class _Auth(httpx2.Auth):
            def auth_flow(self, request):
                request.headers["Authorization"] = f"Bearer {token}"
                response = yield request
                if response.status_code in (401, 403) and outer.refusal is None:
                    outer.refusal = {
                        "http_status": response.status_code,
                        "www_authenticate": response.headers.get("www-authenticate", ""),
                    }

        self.auth = _Auth()


async def call_tool(url: str, token: str, tool: str, arguments: dict) -> dict:
    from fastmcp import Client

    bearer = RecordingBearer(token)
    try:
        async with Client(url, auth=bearer.auth, timeout=20) as client:
            r = await client.call_tool(tool, arguments)
            return {"ok": True, "result": r.data}
    except BaseException as e:  # noqa: BLE001 - a refusal is a result here
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        out = {"ok": False, "reason": f"{type(e).__name__}: {e}"}
        if bearer.refusal:
            out.update(bearer.refusal)
        return out


def call(args) -> dict:
    out = {}
    token = args.token
    if not token:
        ident = identity(args)
        ex = exchange(args, ident)
        out["exchange"] = ex
        if not ex["ok"]:
            out["ok"] = False
            out["reason"] = f"exchange refused: {ex.get('error')}: {ex.get('error_description')}"
            return out
        token = ex["response"]["access_token"]
    arguments = dict(a.split("=", 1) for a in args.arg)
    out.update(asyncio.run(call_tool(args.mcp, token, args.tool, arguments)))
    return out


def calls(args) -> dict:
    """Several tool calls in one process (FastMCP's import is the slow part):
    --calls '[{"token": T, "tool": NAME, "args": {...}}, ...]'."""

    async def run_all(items):
        return [await call_tool(args.mcp, i["token"], i["tool"], i.get("args", {})) for i in items]

    return {"ok": True, "results": asyncio.run(run_all(json.loads(args.calls)))}


def bound(args) -> dict:
    """Calls a resource that checks the token's cnf against this connection's cert."""
    if args.no_cert:
        ctx = ssl.create_default_context(cafile=args.server_ca)
    else:
        ctx = tls(identity(args), server_ca=args.server_ca)
    req = urllib.request.Request(args.url, headers={"Authorization": f"Bearer {args.token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=20) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    body = json.loads(raw or b"{}")
    return {"ok": status == 200, "status": status, **body}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["exchange", "call", "calls", "delegate", "bound", "svid"])
    ap.add_argument("--sts", help="token endpoint base URL (also the JWT-SVID audience)")
    ap.add_argument("--socket", help="Workload API endpoint, unix:///…")
    ap.add_argument("--load")
    ap.add_argument("--save")
    ap.add_argument("--resource")
    ap.add_argument("--audience")
    ap.add_argument("--scope")
    ap.add_argument("--auth", choices=["mtls", "jwt", "assertion"], default="mtls")
    ap.add_argument("--may-act")
    ap.add_argument("--mcp")
    ap.add_argument("--tool")
    ap.add_argument("--arg", action="append", default=[])
    ap.add_argument("--token")
    ap.add_argument("--calls", help="`calls`: a JSON list of {token, tool, args}")
    ap.add_argument("--subject-token")
    ap.add_argument("--actor", choices=["jwt", "mtls"], default="jwt")
    ap.add_argument("--url")
    ap.add_argument("--server-ca", help="`bound`: the resource's CA (PEM)")
    ap.add_argument("--no-cert", action="store_true")
    args = ap.parse_args()

    if args.mode == "svid":
        ident = fetch_identity(args.socket, args.sts, args.save)
        out = {"ok": True, "spiffe_id": ident.spiffe_id}
    elif args.mode == "exchange":
        out = exchange(args, identity(args))
    elif args.mode == "delegate":
        out = delegate(args, identity(args))
    elif args.mode == "call":
        out = call(args)
    elif args.mode == "calls":
        out = calls(args)
    else:
        out = bound(args)
    print(json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
    main()
