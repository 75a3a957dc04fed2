"""Rewrite rendered Kubernetes manifests (kustomize output) into what `podman kube play` can run on one host.

    python kube_play.py RENDERED.yaml --only braintumor-triton --volumes DIR [--host-alias NAME=IP ...] > play.yaml

serving/deploy/smoke.sh uses it to run the base manifests as pods. What it changes, and why (each a difference
between podman 4.3's kube play and a cluster, not a change to what the manifests ask for):

- keeps the ConfigMaps and the Deployments named by --only (one pod each: the HPA that owns replicas is a cluster
  object); Services, HPAs, PDBs and NetworkPolicies have no meaning to kube play and are left out;
- emptyDir volumes become host directories of mode 1777 under --volumes: kube play makes an emptyDir a volume
  owned by root with mode 0755, where Kubernetes makes it 0777 (group-owned by fsGroup), so user 10001 could not
  write its own emptyDir; the /dev/shm emptyDir (medium: Memory) is left to podman's own /dev/shm tmpfs (1777);
- --host-alias NAME=IP adds a hostAliases entry: there is no Service DNS, so `braintumor-triton` (the ConfigMap's
  BRAINTUMOR_TRITON_URL host) is pointed at the Triton pod's address on the pod network.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

PLAYABLE = {"ConfigMap", "Deployment"}


def rewrite(docs: list[dict], only: set[str], volumes: Path, aliases: dict[str, str]) -> tuple[list[dict], list[str]]:
    """The playable documents, and a line per object left out."""
    out, dropped = [], []
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind not in PLAYABLE:
            dropped.append(f"{kind}/{name}")
            continue
        if kind == "Deployment":
            if name not in only:
                continue
            doc["spec"]["replicas"] = 1
            pod = doc["spec"]["template"]["spec"]
            _rewrite_volumes(name, pod, volumes)
            if aliases:
                pod["hostAliases"] = [{"ip": ip, "hostnames": [host]} for host, ip in sorted(aliases.items())]
        out.append(doc)
    missing = only - {d["metadata"]["name"] for d in out if d["kind"] == "Deployment"}
    if missing:
        raise SystemExit(f"no Deployment named {', '.join(sorted(missing))} in the rendered manifests")
    return out, dropped


def _rewrite_volumes(deployment: str, pod: dict, volumes: Path) -> None:
    shm = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
    kept = []
    for volume in pod.get("volumes", []):
        if volume["name"] in shm:
            continue
        if "emptyDir" in volume:
            path = volumes / f"{deployment}-{volume['name']}"
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o1777)
            volume = {"name": volume["name"], "hostPath": {"path": str(path), "type": "Directory"}}
        kept.append(volume)
    if kept:
        pod["volumes"] = kept
    else:
        pod.pop("volumes", None)
    for container in pod["containers"]:
        mounts = [m for m in container.get("volumeMounts", []) if m["name"] not in shm]
        if mounts:
            container["volumeMounts"] = mounts
        else:
            container.pop("volumeMounts", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rendered", type=Path, help="kustomize output (multi-document YAML)")
    parser.add_argument("--only", action="append", required=True, help="a Deployment to play (repeatable)")
    parser.add_argument("--volumes", type=Path, required=True, help="where emptyDir volumes become host directories")
    parser.add_argument("--host-alias", action="append", default=[], metavar="NAME=IP")
    args = parser.parse_args(argv)
    aliases = {}
    for item in args.host_alias:
        host, sep, ip = item.partition("=")
        if not sep or not host or not ip:
            parser.error(f"--host-alias {item!r}: expected NAME=IP")
        aliases[host] = ip
    docs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
    out, dropped = rewrite(docs, set(args.only), args.volumes, aliases)
    print(f"left out (cluster objects kube play does not run): {', '.join(dropped) or 'none'}", file=sys.stderr)
    yaml.safe_dump_all(out, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
