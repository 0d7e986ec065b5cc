"""A protected MCP server (FastMCP, streamable HTTP) with ztid as its authorization server.

Usage: sts_mcp_server.py --issuer URL --bundle PEM [--jwks-uri URL]

Tokens are checked by FastMCP's own JWT verifier
(`fastmcp.server.auth.providers.jwt.JWTVerifier`), configured from ztid's endpoint
alone: the JWKS at `<issuer>/jwks` (fetched over HTTPS, trusting the ztid trust bundle
as the CA), `iss` = the issuer, `aud` = this server's own resource URL, ES256.
Per-tool scopes use FastMCP's `AuthMiddleware` with `restrict_tag`: `read_notes`
needs `tools.read`, `write_note` needs `tools.write`. FastMCP logs why it refused a
token (audience mismatch, expired, …) at INFO/WARNING on stderr.

Binds 127.0.0.1 on a port the kernel picks, then prints one line
`{"listening": "http://127.0.0.1:PORT/mcp"}` (the resource URL, which is also the
audience it accepts) and serves until killed.
"""
import argparse
import json
import socket
import ssl
import sys

import httpx2
from fastmcp import FastMCP
from fastmcp.server.auth import restrict_tag
from fastmcp.server.auth.providers.jwt import JWTVerifier
from fastmcp.server.middleware import AuthMiddleware

NOTES = ["first note"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--bundle", required=True, help="ztid trust bundle (PEM), the CA of the token endpoint")
    ap.add_argument("--jwks-uri", help="default: <issuer>/jwks")
    args = ap.parse_args()

    # Bind first so the resource URL (the audience tokens must carry) names the real port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    resource = f"http://127.0.0.1:{port}/mcp"

    # The JWKS is fetched over HTTPS from ztid: trust exactly the ztid bundle.
    trust = ssl.create_default_context(cafile=args.bundle)
    verifier = JWTVerifier(
        jwks_uri=args.jwks_uri or args.issuer.rstrip("/") + "/jwks",
        issuer=args.issuer,
        audience=resource,
        algorithm="ES256",
        http_client=httpx2.AsyncClient(verify=trust, timeout=10.0),
        # A key rotated in is fetched at the first token naming it.
        jwks_refresh_interval=0,
    )
    # Scopes per tool through FastMCP's authorization middleware, which answers a
    # shortfall with "insufficient scope (required: …)" rather than hiding the tool.
    scopes = AuthMiddleware(
        auth=[
            restrict_tag("reads", scopes=["tools.read"]),
            restrict_tag("writes", scopes=["tools.write"]),
        ]
    )
    mcp = FastMCP("ztid-protected-notes", auth=verifier, middleware=[scopes])

    @mcp.tool(tags={"reads"})
    def read_notes() -> list[str]:
        """The notes (needs scope tools.read)."""
        return list(NOTES)

    @mcp.tool(tags={"writes"})
    def write_note(text: str) -> int:
        """Appends a note (needs scope tools.write); returns the count."""
        NOTES.append(text)
        return len(NOTES)

    print(json.dumps({"listening": resource}), flush=True)
    mcp.run(
        transport="http",
        show_banner=False,
        log_level="info",
        host="127.0.0.1",
        port=port,
        sockets=[sock],
    )


if __name__ == "__main__":
    sys.exit(main())
