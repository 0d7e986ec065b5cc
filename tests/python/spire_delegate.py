"""A SPIRE Delegated Identity API client for tests/tests/e2e/delegated_identity.rs.

Its stubs are generated at start by grpcio-tools from the SPIRE protos vendored under
proto/proto/spire (package spire.api.agent.delegatedidentity.v1, as SPIRE publishes it),
into a fresh temporary directory: nothing ztid-specific is used, so this is what any
SPIRE delegate would send.

usage: spire_delegate.py PROTO_ROOT SOCKET ACTION [ARGS...]

  x509 [--selector TYPE:VALUE]... [--pid N] [--count K]
        subscribe to X.509-SVIDs; print one JSON line per response (ids, leaf and key
        base64, expires_at, federates_with); stop after K responses (default: until the
        stream ends)
  x509-bundles [--count K]
        print SubscribeToX509Bundles' responses as JSON lines: the first K (default 1)
  jwt-bundles [--count K]
        the same for SubscribeToJWTBundles
  jwt --audience A [--selector TYPE:VALUE]... [--pid N]
        print FetchJWTSVIDs' answer as JSON

A gRPC error is printed as one JSON line {"error": CODE, "message": ...}, exit status 3.
"""
import argparse
import atexit
import base64
import importlib
import json
import os
import shutil
import sys
import tempfile


def stubs(proto_root):
    from grpc_tools import protoc
    # Under SPIRE_STUBS_DIR when given (the test's own directory, removed with it even
    # when the test kills this process), else a temporary directory removed at exit.
    out = tempfile.mkdtemp(prefix="spire-stubs-", dir=os.environ.get("SPIRE_STUBS_DIR"))
    atexit.register(shutil.rmtree, out, True)
    files = [
        "spire/api/types/spiffeid.proto",
        "spire/api/types/selector.proto",
        "spire/api/types/x509svid.proto",
        "spire/api/types/jwtsvid.proto",
        "spire/api/agent/delegatedidentity/v1/delegatedidentity.proto",
    ]
    rc = protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out}",
                      f"--grpc_python_out={out}"] + files)
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    pb = importlib.import_module("spire.api.agent.delegatedidentity.v1.delegatedidentity_pb2")
    grpc_pb = importlib.import_module(
        "spire.api.agent.delegatedidentity.v1.delegatedidentity_pb2_grpc")
    types = importlib.import_module("spire.api.types.selector_pb2")
    return pb, grpc_pb, types


def emit(obj):
    print(json.dumps(obj), flush=True)


def spiffe_id(i):
    return f"spiffe://{i.trust_domain}{i.path}"


def main():
    proto_root, sock, action, rest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    ap = argparse.ArgumentParser()
    ap.add_argument("--selector", action="append", default=[])
    ap.add_argument("--pid", type=int, default=0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--audience", action="append", default=[])
    args = ap.parse_args(rest)

    import grpc
    pb, grpc_pb, types = stubs(proto_root)
    selectors = []
    for s in args.selector:
        t, v = s.split(":", 1)
        selectors.append(types.Selector(type=t, value=v))
    channel = grpc.insecure_channel(f"unix://{sock}")
    stub = grpc_pb.DelegatedIdentityStub(channel)
    try:
        if action == "x509":
            req = pb.SubscribeToX509SVIDsRequest(selectors=selectors, pid=args.pid)
            n = 0
            for resp in stub.SubscribeToX509SVIDs(req, timeout=120):
                emit({
                    "ids": [spiffe_id(s.x509_svid.id) for s in resp.x509_svids],
                    "leaves": [base64.b64encode(s.x509_svid.cert_chain[0]).decode()
                               for s in resp.x509_svids],
                    "keys": [base64.b64encode(s.x509_svid_key).decode() for s in resp.x509_svids],
                    "expires_at": [s.x509_svid.expires_at for s in resp.x509_svids],
                    "federates_with": list(resp.federates_with),
                })
                n += 1
                if args.count and n >= args.count:
                    break
            emit({"end": True})
        elif action == "x509-bundles":
            n = 0
            for resp in stub.SubscribeToX509Bundles(pb.SubscribeToX509BundlesRequest(), timeout=120):
                emit({"bundles": {k: base64.b64encode(v).decode()
                                  for k, v in resp.ca_certificates.items()}})
                n += 1
                if n >= max(args.count, 1):
                    break
        elif action == "jwt-bundles":
            n = 0
            for resp in stub.SubscribeToJWTBundles(pb.SubscribeToJWTBundlesRequest(), timeout=120):
                emit({"bundles": {k: json.loads(v) for k, v in resp.bundles.items()}})
                n += 1
                if n >= max(args.count, 1):
                    break
        elif action == "jwt":
            resp = stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(
                audience=args.audience, selectors=selectors, pid=args.pid), timeout=30)
            emit({"svids": [{"id": spiffe_id(s.id), "token": s.token, "expires_at": s.expires_at,
                             "issued_at": s.issued_at} for s in resp.svids]})
        else:
            sys.exit(f"unknown action {action}")
    except grpc.RpcError as e:
        emit({"error": e.code().name, "message": e.details()})
        sys.exit(3)


if __name__ == "__main__":
    main()
