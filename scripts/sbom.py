#!/usr/bin/env python3
"""CycloneDX 1.5 SBOMs for ztid's binaries, and a check that an SBOM is complete.

    scripts/sbom.py generate --bin ztid-agent [--out FILE]
    scripts/sbom.py check    --bin ztid-agent --sbom FILE

A binary is found by its NAME through `cargo metadata` (whichever workspace
crate declares it), never by a path. Its components are exactly the crates of
`cargo tree -e normal --target <host> -p <that crate>`: normal dependencies
only (no build or dev dependencies), resolved with the features that
`cargo build -p <that crate>` would use (not unified with the rest of the
workspace). Proc-macro crates are in that tree and so in the SBOM: they run in
the build and shape the code.

Each component carries name, version, purl (pkg:cargo/NAME@VERSION), its
license (SPDX expression, `/` normalised to ` OR `), its source (the Cargo
source id, or "workspace" for ztid's own crates; property `cargo:source`) and,
for registry crates, the SHA-256 of the .crate file as recorded in Cargo.lock.
The document's `dependencies` carry the edges of the same tree.

The output is deterministic (serial number derived from the content, timestamp
from SOURCE_DATE_EPOCH or the last commit), so two release builds of one commit
produce identical SBOMs.

`check` recomputes the tree independently of the file and fails, one line per
problem, when a crate of the tree is missing from the SBOM or lacks version,
license, source or purl (or, for a registry crate, its hash).

Standard library only (Python >= 3.11 for tomllib).
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
import uuid

TOOL_NAME = "ztid scripts/sbom.py"
TOOL_VERSION = "1"
CRATES_IO_SOURCE_PREFIX = "registry+"


def die(msg):
    print(f"sbom: {msg}", file=sys.stderr)
    sys.exit(2)


def run(cmd, cwd=None):
    try:
        out = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        die(f"command not found: {cmd[0]}")
    except subprocess.CalledProcessError as e:
        die(f"`{' '.join(cmd)}` failed ({e.returncode}):\n{e.stderr.strip()}")
    return out.stdout


def host_target():
    t = os.environ.get("ZTID_SBOM_TARGET")
    if t:
        return t
    for line in run(["rustc", "-vV"]).splitlines():
        if line.startswith("host: "):
            return line.split(": ", 1)[1].strip()
    die("cannot tell the host target from `rustc -vV`")


def metadata():
    return json.loads(run(["cargo", "metadata", "--format-version", "1", "--locked"]))


def package_of_bin(meta, bin_name):
    members = set(meta["workspace_members"])
    owners = [
        p
        for p in meta["packages"]
        if p["id"] in members
        and any(t["name"] == bin_name and "bin" in t["kind"] for t in p["targets"])
    ]
    if len(owners) != 1:
        die(f"binary {bin_name!r} is declared by {len(owners)} workspace crates, expected exactly 1")
    return owners[0]


TREE_LINE = re.compile(r"^(\d+)(\S+) v(\S+)(?: \(([^)]*)\))?(?: \(proc-macro\))?(?: \(\*\))?$")


def cargo_tree(pkg, target):
    """[(depth, name, version)] of `cargo tree -e normal` in depth-first order."""
    out = run(
        [
            "cargo", "tree", "--locked", "-e", "normal", "--target", target,
            "-p", pkg["id"], "--prefix", "depth", "-f", "{p}",
        ]
    )
    rows = []
    for line in out.splitlines():
        if not line.strip():
            continue
        m = TREE_LINE.match(line)
        if not m:
            die(f"unparsed `cargo tree` line: {line!r}")
        rows.append((int(m.group(1)), m.group(2), m.group(3)))
    if not rows or rows[0][0] != 0:
        die("`cargo tree` printed no root")
    return rows


def lock_checksums(root):
    with open(os.path.join(root, "Cargo.lock"), "rb") as f:
        lock = tomllib.load(f)
    sums = {}
    for p in lock.get("package", []):
        if "checksum" in p:
            sums[(p["name"], p["version"], p.get("source", ""))] = p["checksum"]
    return sums


def spdx(expr):
    # Old crates write `MIT/Apache-2.0`: the deprecated form of `MIT OR Apache-2.0`.
    return re.sub(r"\s*/\s*", " OR ", expr.strip())


def purl(name, version):
    return f"pkg:cargo/{name}@{version}"


def by_name_version(meta):
    index = {}
    for p in meta["packages"]:
        index.setdefault((p["name"], p["version"]), []).append(p)
    return index


def resolve(index, name, version):
    cands = index.get((name, version), [])
    if len(cands) != 1:
        die(f"{name} {version}: {len(cands)} packages in `cargo metadata` with that name and version")
    return cands[0]


def source_of(p, members):
    if p["id"] in members:
        return "workspace"
    return p.get("source") or "path"


def component(p, members, sums):
    c = {
        "type": "library",
        "bom-ref": purl(p["name"], p["version"]),
        "name": p["name"],
        "version": p["version"],
        "scope": "required",
        "purl": purl(p["name"], p["version"]),
    }
    if p.get("description"):
        c["description"] = " ".join(p["description"].split())
    if p.get("license"):
        c["licenses"] = [{"expression": spdx(p["license"])}]
    elif p.get("license_file"):
        # No SPDX id declared: name the file the crate ships instead (relative, so no local path leaks).
        rel = os.path.basename(p["license_file"])
        c["licenses"] = [{"license": {"name": f"LicenseRef-file-{rel}"}}]
    src = source_of(p, members)
    checksum = sums.get((p["name"], p["version"], p.get("source") or ""))
    if checksum:
        c["hashes"] = [{"alg": "SHA-256", "content": checksum}]
    c["properties"] = [{"name": "cargo:source", "value": src}]
    refs = []
    if p.get("repository"):
        refs.append({"type": "vcs", "url": p["repository"]})
    if refs:
        c["externalReferences"] = refs
    return c


def timestamp():
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        try:
            epoch = subprocess.run(
                ["git", "log", "-1", "--format=%ct"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            epoch = "0"
    return datetime.datetime.fromtimestamp(int(epoch or 0), datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def generate(bin_name, out_path):
    meta = metadata()
    root_dir = meta["workspace_root"]
    members = set(meta["workspace_members"])
    pkg = package_of_bin(meta, bin_name)
    target = host_target()
    rows = cargo_tree(pkg, target)
    index = by_name_version(meta)
    sums = lock_checksums(root_dir)

    # Edges from the depth-first listing: a line's parent is the last line one level up.
    deps = {}
    stack = []
    for depth, name, version in rows:
        ref = purl(name, version)
        deps.setdefault(ref, set())
        del stack[depth:]
        if stack:
            deps[stack[-1]].add(ref)
        stack.append(ref)

    root_ref = purl(pkg["name"], pkg["version"])
    seen = set()
    comps = []
    for _, name, version in rows:
        ref = purl(name, version)
        if ref in seen or ref == root_ref:
            continue
        seen.add(ref)
        comps.append(component(resolve(index, name, version), members, sums))
    comps.sort(key=lambda c: (c["name"], c["version"]))

    root = component(pkg, members, sums)
    root["type"] = "application"
    root["name"] = bin_name
    root["bom-ref"] = root_ref
    root["properties"].append({"name": "cargo:crate", "value": pkg["name"]})
    root["properties"].append({"name": "cargo:target", "value": target})

    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "timestamp": timestamp(),
            "tools": {"components": [{"type": "application", "name": TOOL_NAME, "version": TOOL_VERSION}]},
            "component": root,
        },
        "components": comps,
        "dependencies": [
            {"ref": ref, "dependsOn": sorted(d)} for ref, d in sorted(deps.items())
        ],
    }
    body = json.dumps(bom, sort_keys=True).encode()
    bom["serialNumber"] = "urn:uuid:" + str(uuid.UUID(bytes=hashlib.sha256(body).digest()[:16], version=4))
    text = json.dumps(bom, indent=2, sort_keys=True) + "\n"
    if out_path and out_path != "-":
        with open(out_path, "w") as f:
            f.write(text)
        print(f"sbom: {bin_name} ({pkg['name']}): {len(comps)} components -> {out_path}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def check(bin_name, sbom_path):
    try:
        with open(sbom_path) as f:
            bom = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"SBOM {sbom_path}: cannot read: {e}")
        return 1
    meta = metadata()
    members = set(meta["workspace_members"])
    pkg = package_of_bin(meta, bin_name)
    rows = cargo_tree(pkg, host_target())
    index = by_name_version(meta)

    problems = []
    if bom.get("bomFormat") != "CycloneDX" or bom.get("specVersion") != "1.5":
        problems.append("not a CycloneDX 1.5 document")
    root = (bom.get("metadata") or {}).get("component") or {}
    if root.get("name") != bin_name:
        problems.append(f"metadata.component is {root.get('name')!r}, not {bin_name!r}")

    have = {}
    for c in bom.get("components") or []:
        have[(c.get("name"), c.get("version"))] = c
    # The root crate is described by metadata.component, named after the binary.
    root_props = {x.get("name"): x.get("value") for x in root.get("properties") or []}
    if root_props.get("cargo:crate") == pkg["name"] and root.get("version") == pkg["version"]:
        have[(pkg["name"], pkg["version"])] = root

    expected = sorted({(n, v) for _, n, v in rows})
    for name, version in expected:
        c = have.get((name, version))
        if c is None:
            others = sorted(v for (n, v) in have if n == name)
            hint = f" (SBOM has {name} {', '.join(others)})" if others else ""
            problems.append(f"MISSING {name} {version}{hint}")
            continue
        p = resolve(index, name, version)
        lacks = []
        if not c.get("version"):
            lacks.append("version")
        if not c.get("licenses"):
            lacks.append("license")
        props = {x.get("name"): x.get("value") for x in c.get("properties") or []}
        if not props.get("cargo:source"):
            lacks.append("source")
        if not (c.get("purl") or "").startswith(f"pkg:cargo/{name}@"):
            lacks.append("purl")
        if p["id"] not in members and (p.get("source") or "").startswith(CRATES_IO_SOURCE_PREFIX):
            if not any(h.get("alg") == "SHA-256" and h.get("content") for h in c.get("hashes") or []):
                lacks.append("SHA-256 hash")
        if lacks:
            problems.append(f"INCOMPLETE {name} {version}: no {', '.join(lacks)}")

    extra = sorted(set(have) - set(expected))
    for name, version in extra:
        # Not an error for completeness, but an SBOM listing what the binary does not contain is stale.
        problems.append(f"EXTRA {name} {version}: in the SBOM but not in `cargo tree` (stale SBOM?)")

    if problems:
        for line in problems:
            print(f"SBOM {bin_name} ({sbom_path}): {line}")
        print(f"SBOM {bin_name}: FAILED, {len(problems)} problem(s); {len(expected)} crates expected")
        return 1
    print(f"SBOM {bin_name}: complete, {len(expected)} crates (crate {pkg['name']}), each with version, license, source, purl")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--bin", required=True)
    g.add_argument("--out", default="-")
    c = sub.add_parser("check")
    c.add_argument("--bin", required=True)
    c.add_argument("--sbom", required=True)
    a = ap.parse_args()
    # Work on the checkout this script belongs to, wherever it is called from.
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if a.cmd == "generate":
        generate(a.bin, a.out)
        return 0
    return check(a.bin, a.sbom)


if __name__ == "__main__":
    sys.exit(main())
