"""Unmodified py-spiffe (PyPI `spiffe`) against a ztid agent.

Usage: py_spiffe_client.py unix:///path/to/api.sock AUDIENCE
Prints one JSON object with what the client saw; exits non-zero on any error.
"""
import json
import sys

from spiffe import WorkloadApiClient, JwtSvid


def main() -> None:
    endpoint, audience = sys.argv[1], sys.argv[2]
    client = WorkloadApiClient(socket_path=endpoint, default_timeout=20)
    try:
        svid = client.fetch_x509_svid()
        context = client.fetch_x509_context()
        bundles = client.fetch_x509_bundles()
        jwt = client.fetch_jwt_svid(audience={audience})
        validated = client.validate_jwt_svid(jwt.token, audience)
        jwt_bundles = client.fetch_jwt_bundles()
        td = svid.spiffe_id.trust_domain
        # Independent of the agent: verify the token with the JWT bundle.
        offline = JwtSvid.parse_and_validate(jwt.token, jwt_bundles.get_bundle_for_trust_domain(td), {audience})
        wrong_audience_refused = False
        try:
            client.validate_jwt_svid(jwt.token, audience + "-other")
        except Exception:
            wrong_audience_refused = True
        print(json.dumps({
            "x509_spiffe_id": str(svid.spiffe_id),
            "chain_length": len(svid.cert_chain),
            "context_svids": len(context.x509_svids),
            "x509_bundle_authorities": len(bundles.get_bundle_for_trust_domain(td).x509_authorities),
            "jwt_spiffe_id": str(jwt.spiffe_id),
            "validated_spiffe_id": str(validated.spiffe_id),
            "offline_spiffe_id": str(offline.spiffe_id),
            "wrong_audience_refused": wrong_audience_refused,
        }))
    finally:
        client.close()


if __name__ == "__main__":
    main()
