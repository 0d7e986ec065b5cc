#!/usr/bin/env bash
# Fills fuzz/corpus/<target>/ with seed inputs, at run time: the real SEV-SNP and TDX
# evidence from the shared vectors (../shared/vectors from the repository root, or
# $ZTID_VECTORS) and small hand-built messages (TPM structures, HTTP/2 connections,
# selectors, bundles, JWTs, attestation JSON). Nothing here is committed: fuzz/corpus is
# git-ignored, and the vectors, other projects' public data, are only read.
#
# Usage: fuzz/seed.sh   (idempotent; seeds are named seed-*, libFuzzer's own finds are kept)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
vectors=${ZTID_VECTORS:-$root/../shared/vectors}
corpus=$here/corpus

if [ ! -d "$vectors" ]; then
    echo "seed.sh: no vectors at $vectors (set ZTID_VECTORS); SNP/TDX targets get hand-built seeds only" >&2
fi

ZTID_VECTORS=$vectors CORPUS=$corpus python3 - <<'PY'
import base64, json, os, struct, subprocess, pathlib, glob

vectors = pathlib.Path(os.environ["ZTID_VECTORS"])
corpus = pathlib.Path(os.environ["CORPUS"])
counts = {}

def seed(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    d = corpus / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)
    counts[target] = counts.get(target, 0) + 1

def read(p):
    try:
        return pathlib.Path(p).read_bytes()
    except OSError:
        return None

def pem_ders(text):
    """The DER of every PEM block in text."""
    out, cur = [], None
    for line in text.decode(errors="replace").splitlines():
        if line.startswith("-----BEGIN "):
            cur = []
        elif line.startswith("-----END ") and cur is not None:
            out.append(base64.b64decode("".join(cur)))
            cur = None
        elif cur is not None:
            cur.append(line.strip())
    return out

def cert_der(p):
    b = read(p)
    if b is None:
        return []
    return pem_ders(b) if b"-----BEGIN" in b else [b]

# ---------------------------------------------------------------- TPM
def tpm2b(b):
    return struct.pack(">H", len(b)) + b

RSA, SHA256, NULL, RSASSA, ECDSA, ECC, AES, CFB = 0x0001, 0x000B, 0x0010, 0x0014, 0x0018, 0x0023, 0x0006, 0x0043
EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
def rsa_public(attrs, sym, scheme, modulus):
    s = struct.pack(">HHI", RSA, SHA256, attrs) + tpm2b(EK_POLICY if sym else b"")
    s += struct.pack(">HHH", AES, 128, CFB) if sym else struct.pack(">H", NULL)
    s += scheme + struct.pack(">HI", len(modulus) * 8, 0) + tpm2b(modulus)
    return s
def ecc_public(attrs, sym, scheme, x, y):
    s = struct.pack(">HHI", ECC, SHA256, attrs) + tpm2b(EK_POLICY if sym else b"")
    s += struct.pack(">HHH", AES, 128, CFB) if sym else struct.pack(">H", NULL)
    s += scheme + struct.pack(">HH", 0x0003, NULL) + tpm2b(x) + tpm2b(y)
    return s
ek_rsa = rsa_public(0x000300B2, True, struct.pack(">H", NULL), bytes([0xC5]) + b"\x11" * 255)
ek_ecc = ecc_public(0x000300B2, True, struct.pack(">H", NULL), b"\x22" * 32, b"\x33" * 32)
ak_rsa = rsa_public(0x00050072, False, struct.pack(">HH", RSASSA, SHA256), bytes([0xC5]) + b"\x44" * 255)
ak_ecc = ecc_public(0x00050072, False, struct.pack(">HH", ECDSA, SHA256), b"\x55" * 32, b"\x66" * 32)
name = struct.pack(">H", SHA256) + b"\x77" * 32
def attest(typ, body):
    return (struct.pack(">IH", 0xFF544347, typ) + tpm2b(name) + tpm2b(b"\x88" * 32)
            + struct.pack(">QIIB", 123456, 3, 0, 1) + struct.pack(">Q", 0x2000_0000_0001_0000) + body)
quote = attest(0x8018, struct.pack(">IHB", 1, SHA256, 3) + bytes([0x83, 0x00, 0x00]) + tpm2b(b"\x99" * 32))
certify = attest(0x8017, tpm2b(name) + tpm2b(name))
sig_rsa = struct.pack(">HH", RSASSA, SHA256) + tpm2b(b"\xAA" * 256)
sig_ecc = struct.pack(">HH", ECDSA, SHA256) + tpm2b(b"\xBB" * 32) + tpm2b(b"\xCC" * 32)
for n, b in [("ek-rsa", ek_rsa), ("ek-ecc", ek_ecc), ("ak-rsa", ak_rsa), ("ak-ecc", ak_ecc),
             ("quote", quote), ("certify", certify), ("sig-rsa", sig_rsa), ("sig-ecdsa", sig_ecc)]:
    seed("tpm_wire", n, b)

# ---------------------------------------------------------------- SEV-SNP
GUID = {
    "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae",
    "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
    "vcek": "63da758d-e664-4564-adc5-f4b93be8accd",
    "vlek": "a8074bc2-a25a-483e-aae6-39c045a0b8a1",
    "crl": "92f81bc3-5811-4d3d-97ff-d19f88dc67ea",
}

def cert_table(entries):
    """The GHCB certificate table: 24-byte entries (GUID, u32 LE offset, u32 LE length),
    an all-zero terminator, then the blobs."""
    header = (len(entries) + 1) * 24
    table, blobs = b"", b""
    for kind, data in entries:
        table += bytes.fromhex(GUID[kind].replace("-", ""))
        table += struct.pack("<II", header + len(blobs), len(data))
        blobs += data
    return table + b"\0" * 24 + blobs

snp = vectors / "snp"
reports = {}
for d in sorted(glob.glob(str(snp / "*"))):
    d = pathlib.Path(d)
    r = read(d / "report.bin")
    if r is None:
        h = read(d / "report_milan.hex")
        if h is not None:
            r = bytes.fromhex(h.decode().strip())
    if r is not None:
        reports[d.name] = r
    vek = []
    for f in ("vcek.der", "vcek.pem", "vcek_milan.der", "vcek_turin.der"):
        vek += [("vcek", c) for c in cert_der(d / f)]
    vek += [("vlek", c) for c in cert_der(d / "vlek.der")]
    chain = []
    for f in ("cert_chain_milan", "cert_chain_turin", "ask.pem"):
        ders = cert_der(d / f)
        chain += list(zip(["ask", "ark"], ders))
    if r is not None:
        seed("snp_evidence", d.name, r)
        if vek:
            seed("snp_evidence", d.name + "-table", r + cert_table(vek + chain))
        # Through an SVSM: the manifest (a vTPM EK's TPMT_PUBLIC, made up) first.
        seed("snp_evidence", d.name + "-svsm", b"ZTIDSVSM" + struct.pack("<I", len(ek_ecc)) + ek_ecc + r)
    if vek or chain:
        seed("snp_cert_table", d.name, cert_table(vek + chain))
for gen in ("milan", "genoa", "turin"):
    ders = cert_der(snp / "roots" / f"{gen}_ask_ark_asvk.pem")
    if len(ders) >= 2:
        seed("snp_cert_table", "roots-" + gen, cert_table([("ask", ders[0]), ("ark", ders[1])]))
seed("snp_cert_table", "empty", b"\0" * 24)
seed("snp_cert_table", "unknown-guid", b"\x11" * 16 + struct.pack("<II", 48, 4) + b"\0" * 24 + b"abcd")

# ---------------------------------------------------------------- TDX
for q in sorted(glob.glob(str(vectors / "tdx" / "*" / "quote.bin"))):
    q = pathlib.Path(q)
    seed("tdx_quote", q.parent.name, read(q))

# ---------------------------------------------------------------- attestation JSON
b64 = lambda b: base64.b64encode(b).decode()
initial = {"ek_cert": b64(b"\x30\x03\x02\x01\x00"), "ek_pub": b64(ek_rsa), "ak_pub": b64(ak_rsa), "agent_key_pub": b64(ak_ecc)}
challenge = {"credential_blob": b64(b"\x01" * 68), "encrypted_secret": b64(b"\x02" * 256), "nonce": b64(b"\x03" * 32), "pcrs": [0, 1, 7]}
answer = {"secret": b64(b"\x04" * 32), "quote": b64(quote), "signature": b64(sig_rsa),
          "pcrs": {"0": "00" * 32, "7": "ff" * 32}, "certify": b64(certify), "certify_signature": b64(sig_ecc)}
evfile = {"format": "ztid-tpm-evidence/1", "ek_cert": b64(b"\x30\x03\x02\x01\x00"), "ek_pub": b64(ek_ecc), "ak_pub": b64(ak_ecc),
          "nonce": "88" * 32, "quote": b64(quote), "signature": b64(sig_ecc), "pcrs": {"0": "00" * 32}}
for n, v in [("tpm-initial", initial), ("tpm-challenge", challenge), ("tpm-answer", answer), ("tpm-evidence-file", evfile)]:
    seed("attestation_json", n, json.dumps(v))
first_snp = next(iter(reports.values()), b"\0" * 1184)
seed("attestation_json", "multi", json.dumps({"parts": [
    {"method": "tpm", "data": b64(json.dumps(initial).encode())},
    {"method": "sev-snp", "data": b64(first_snp[:64])}]}))
seed("attestation_json", "multi-answer", json.dumps({"parts": [{"method": "tpm", "data": b64(json.dumps(answer).encode())}]}))

# ---------------------------------------------------------------- selectors
seed("selector", "all", "\n".join([
    "unix:uid:1000", "unix:gid:0", "unix:user:alice", "unix:group:wheel", "unix:path:/usr/bin/python3",
    "unix:sha256:" + "ab" * 32, "join-token:used", "join-token:id:abc", "tpm:ek-hash:" + "0f" * 32,
    "tpm:pcr:7:" + "00" * 32, "tpm:manufacturer:id:53544d20", "tpm:ek-issuer:CN=x", "tpm:ek-cert:x",
    "sev-snp:measurement:" + "5a" * 48, "sev-snp:policy:0x30000", "sev-snp:host-data:" + "42" * 32,
    "sev-snp:chip-id:" + "01" * 64, "sev-snp:vtpm-ek-hash:" + "0e" * 32, "tdx:mrtd:" + "91" * 48,
    "tdx:rtmr0:" + "44" * 48, "tdx:rtmr3:" + "00" * 48, "tdx:mrconfigid:" + "00" * 48, "multi:method:tpm"]))
seed("selector", "json", json.dumps("unix:uid:1000"))

# ---------------------------------------------------------------- cgroup files
cid = "3f" * 32
for n, body in {
    "v2-docker": f"0::/system.slice/docker-{cid}.scope\n",
    "v1-podman": f"12:pids:/libpod_parent/libpod-{cid}\n11:memory:/libpod_parent/libpod-{cid}\n1:name=systemd:/libpod_parent/libpod-{cid}\n0::/\n",
    "v1-cri": f"5:cpu,cpuacct:/kubepods/besteffort/pod0b4f2c1e-1111-2222-3333-444455556666/{cid}\n",
    "v2-crio": f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/crio-{cid}.scope\n",
    "v2-ctr": f"0::/default/{cid}\n",
    "v2-unit": "0::/system.slice/ztid-agent.service\n",
    "v2-user": f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/libpod-{cid}.scope\n",
}.items():
    seed("cgroup_file", n, body)

# ---------------------------------------------------------------- bundles
def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
p256 = bytes.fromhex("e72e2fa24e14ba9e1201ac62196502fc938b159fca34da5486bde0bdbca2521b17339e7a51c526eed0ae107d558395e9cd104134e9922783abc438ffb144804a")
p384 = bytes.fromhex("33e99f873a85218169f4d16c2808319a6499dfc430a308859f554d5a354d8cbe8784581422c487c6dc183c8654052e05efc84c01de6072f8647d4d7960dc1eab57aec14b0f2183a9631831ba180268759a079404596374c546ded708d553a0a2")
jwt_keys = [{"kty": "EC", "crv": "P-256", "x": b64u(p256[:32]), "y": b64u(p256[32:]), "kid": "k256", "use": "jwt-svid"},
            {"kty": "EC", "crv": "P-384", "x": b64u(p384[:48]), "y": b64u(p384[48:]), "kid": "k384", "use": "jwt-svid"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa", "use": "jwt-svid"},
            {"kty": "EC", "use": "other"}]
x509_keys = []
try:
    ca = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                         "-nodes", "-keyout", "/dev/null", "-subj", "/CN=fuzz seed CA", "-days", "1",
                         "-addext", "subjectAltName=URI:spiffe://example.org", "-outform", "DER"],
                        capture_output=True, check=True).stdout
    x509_keys.append({"kty": "EC", "crv": "P-256", "x": b64u(p256[:32]), "y": b64u(p256[32:]), "use": "x509-svid", "x5c": [b64(ca)]})
    seed("bundle_json", "pem", "-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(ca).decode() + "-----END CERTIFICATE-----\n")
except (OSError, subprocess.CalledProcessError):
    pass
for n, ders in [("amd-milan", cert_der(snp / "roots" / "milan_ask_ark_asvk.pem"))]:
    if ders:
        x509_keys.append({"kty": "RSA", "use": "x509-svid", "x5c": [b64(ders[0])]})
seed("bundle_json", "full", json.dumps({"keys": x509_keys + jwt_keys, "spiffe_sequence": 7, "spiffe_refresh_hint": 300}, indent=1))
seed("bundle_json", "jwks", json.dumps({"keys": jwt_keys[:2]}))
seed("bundle_json", "empty", '{"keys":[]}')

# ---------------------------------------------------------------- JWT
# Even first byte: a token as it is. This one is signed by the harness's fixed P-256 key.
token = ("eyJhbGciOiJFUzI1NiIsImtpZCI6ImsyNTYiLCJ0eXAiOiJKV1QifQ."
         "eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy93b3JrbG9hZCIsImF1ZCI6WyJzcGlmZmU6Ly9leGFtcGxlLm9yZy9hdWRpZW5jZSJdLCJleHAiOjQxMDI0NDQ4MDAsImlhdCI6MTcwMDAwMDAwMH0."
         "yY97q3TTfzxC-gIlX1u0-RMY3IiILgeZfv7KL76eMuH2UIplJpNPv-WVDAccm4HS9b8MUYYj5QTBtbxak2ummA")
seed("jwt", "token", b"\x00" + token.encode())
seed("jwt", "token-384", b"\x00" + token.replace("k256", "k384").encode())
# Odd first byte: header NUL claims, signed by the harness.
hdr = {"alg": "ES256", "kid": "k256", "typ": "JWT"}
claims = {"sub": "spiffe://example.org/w", "aud": "spiffe://example.org/audience", "exp": 4102444800, "nbf": 1}
seed("jwt", "signed", b"\x01" + json.dumps(hdr).encode() + b"\0" + json.dumps(claims).encode())
seed("jwt", "signed-list-aud", b"\x01" + json.dumps(hdr).encode() + b"\0" + json.dumps(dict(claims, aud=["a", "spiffe://example.org/audience"])).encode())
seed("jwt", "signed-expired", b"\x01" + json.dumps(dict(hdr, typ="JOSE")).encode() + b"\0" + json.dumps(dict(claims, exp=5)).encode())

# ---------------------------------------------------------------- token endpoint
# First byte: 0 token request, 1 introspection request, 2 access token, 3 claims JSON, else scopes.
TE = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
AT, JT = "urn:ietf:params:oauth:token-type:access_token", "urn:ietf:params:oauth:token-type:jwt"
for n, body in [("mtls", f"{TE}&audience=tools&scope=tools.read+tools.write"),
                ("delegation", f"{TE}&resource=https%3A%2F%2Fmcp.example%2Ftools&subject_token=a.b.c"
                               f"&subject_token_type={AT}&actor_token=d.e.f&actor_token_type={JT}&requested_token_type={AT}"),
                ("assertion", f"{TE}&audience=x&client_assertion=a.b.c&client_id=spiffe%3A%2F%2Fexample.org%2Fa"
                              "&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
                              "&may_act=spiffe%3A%2F%2Fexample.org%2Fb")]:
    seed("sts_request", n, b"\x00" + body.encode())
seed("sts_request", "introspect", b"\x01token=a.b.c&token_type_hint=access_token")
at_claims = {"iss": "https://127.0.0.1:8443", "sub": "spiffe://example.org/u/i", "aud": "tools",
             "client_id": "spiffe://example.org/a/i", "scope": "a b", "jti": "AAAAAAAAAAAAAAAAAAAAAA",
             "iat": 1700000000, "exp": 1700000300, "cnf": {"x5t#S256": "x"}, "ztid_grant": "g",
             "act": {"sub": "spiffe://example.org/a/i", "act": {"sub": "spiffe://example.org/b"}},
             "may_act": {"sub": "spiffe://example.org/a"}, "ztid_node": {"agent": "spiffe://example.org/n", "selectors": []}}
at_hdr = {"alg": "ES256", "kid": "k", "typ": "at+jwt"}
seed("sts_request", "access-token", b"\x02" + (b64u(json.dumps(at_hdr).encode()) + "." + b64u(json.dumps(at_claims).encode()) + ".AAAA").encode())
seed("sts_request", "claims", b"\x03" + json.dumps(at_claims).encode())
seed("sts_request", "act", b"\x03" + json.dumps(at_claims["act"]).encode())
seed("sts_request", "scopes", b"\x04tools.read tools.write !#[]~")

# ---------------------------------------------------------------- HTTP/2
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
def hstr(s):
    assert len(s) < 127
    return bytes([len(s)]) + s
def lit_indexed_name(index, value):      # literal with incremental indexing, indexed name
    return bytes([0x40 | index]) + hstr(value)
def lit_new_name(name, value):           # literal without indexing, new name
    return b"\x00" + hstr(name) + hstr(value)
settings = frame(0x4, 0, 0, struct.pack(">HI", 0x2, 0))
def request(authority, stream, extra=b""):
    block = b"\x83\x86" + lit_indexed_name(4, b"/ztid.Workload/Fetch") + lit_indexed_name(1, authority)
    block += lit_new_name(b"content-type", b"application/grpc") + lit_new_name(b"te", b"trailers") + extra
    return block
good = PREFACE + settings + frame(0x1, 0x4, 1, request(b"localhost", 1)) + frame(0x0, 0x1, 1, b"\0\0\0\0\0")
bad1 = request(b"tmp%2Fx%2Fapi.sock", 1)
# The second request reuses the dynamic table (indices 62, 63: the authority and path).
bad2 = b"\x83\x86\xbe\xbf" + lit_new_name(b"te", b"trailers")
bad = (PREFACE + settings + frame(0x1, 0x4, 1, bad1) + frame(0x0, 0x1, 1, b"\0\0\0\0\0")
       + frame(0x1, 0x5, 3, bad2) + frame(0x8, 0, 0, struct.pack(">I", 65535)))
split = (PREFACE + settings + frame(0x1, 0x20, 1, b"\x00\x00\x00\x00\x10" + bad1[:10])
         + frame(0x9, 0, 1, bad1[10:20]) + frame(0x9, 0x4, 1, bad1[20:]))
padded = PREFACE + frame(0x1, 0x8 | 0x4, 1, b"\x03" + bad1 + b"\0\0\0")
table = PREFACE + frame(0x1, 0x4, 1, b"\x3f\xe1\x1f" + bad1)       # dynamic table size update 4096
for n, b in [("good", good), ("bad-authority", bad), ("continuation", split), ("padded", padded), ("size-update", table),
             ("ping-goaway", PREFACE + frame(0x6, 0, 0, b"\0" * 8) + frame(0x7, 0, 0, b"\0" * 8)), ("not-h2", b"GET / HTTP/1.1\r\n\r\n")]:
    for mode in (0, 0x0b):
        seed("h2_authority", f"{n}-{mode}", bytes([mode]) + b)

# spiffe_id_and_leaf: byte 0 picks IDs as lines (0), a DER leaf (1) or PEM (2).
seed("spiffe_id_and_leaf", "ids", b"\x00" + "\n".join([
    "spiffe://example.org", "spiffe://example.org/ns/prod/sa/web", "spiffe://example.org/ztid/agent/tpm/abc",
    "spiffe://example.org/w/0123456789abcdef0123456789abcdef", "SPIFFE://Example.org/a", "spiffe://example.org/a/../b",
    "spiffe://example.org/a//b", "spiffe://example.org/a/", "spiffe://example.org./a", "spiffe://ex%41mple.org/a",
    "spiffe://example.org:8443/a", "spiffe://user@example.org/a", "example.org", "spiffe://example.org/a?q#f"]).encode())
try:
    leaf = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                           "-nodes", "-keyout", "/dev/null", "-subj", "/O=SPIRE", "-days", "1",
                           "-addext", "subjectAltName=URI:spiffe://example.org/w/web",
                           "-addext", "basicConstraints=critical,CA:FALSE", "-outform", "DER"],
                          capture_output=True, check=True).stdout
    seed("spiffe_id_and_leaf", "leaf", b"\x01" + leaf)
    seed("spiffe_id_and_leaf", "pem", b"\x02" + ("-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(leaf).decode()
                                                  + "-----END CERTIFICATE-----\n").encode())
except (OSError, subprocess.CalledProcessError):
    pass

for t in sorted(counts):
    print(f"seed.sh: {counts[t]:3d} seeds in corpus/{t}")
PY
