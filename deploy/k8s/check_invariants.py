#!/usr/bin/env python3
"""Invariants of deploy/k8s/tweed.yaml that schema validation cannot see.

    python3 deploy/k8s/check_invariants.py [deploy/k8s/tweed.yaml]
    python3 deploy/k8s/check_invariants.py --self-test   # each broken variant must be caught

Prints one line per violation and exits 1 if there is any. Needs PyYAML (kubernetes-validate
depends on it). Run by deploy/check.
"""

import copy
import json
import os
import re
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = 9867
CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "tweed",
    "plugins": [
        {"type": "tweed"},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}
# mount path in the tweedd container -> (host path, must be read-only)
HOST_MOUNTS = {
    "/run/tweed": ("/run/tweed", False),
    "/run/xtables.lock": ("/run/xtables.lock", False),
    "/lib/modules": ("/lib/modules", True),
    "/var/lib/tweed": ("/var/lib/tweed", False),
    "/dev/net/tun": ("/dev/net/tun", False),
}
ALLOWED_CAPS = {"NET_ADMIN", "NET_RAW"}
READ_VERBS = {"get", "list", "watch"}


def find(docs, kind):
    return [d for d in docs if d and d.get("kind") == kind]


def one(docs, kind, errs):
    found = find(docs, kind)
    if len(found) != 1:
        errs.append(f"expected exactly one {kind}, found {len(found)}")
        return None
    return found[0]


def check_rbac(docs, errs):
    ns = one(docs, "Namespace", errs)
    sa = one(docs, "ServiceAccount", errs)
    role = one(docs, "ClusterRole", errs)
    binding = one(docs, "ClusterRoleBinding", errs)
    if not (ns and sa and role and binding):
        return
    if sa["metadata"].get("namespace") != ns["metadata"]["name"]:
        errs.append("ServiceAccount is not in the tweed Namespace")
    for rule in role.get("rules") or []:
        bad = set(rule.get("verbs", [])) - READ_VERBS
        if bad:
            errs.append(f"ClusterRole grants more than read access: {sorted(bad)} on {rule.get('resources')}")
    ref = binding.get("roleRef", {})
    if ref.get("kind") != "ClusterRole" or ref.get("name") != role["metadata"]["name"]:
        errs.append("ClusterRoleBinding does not bind the tweed ClusterRole")
    subj = {(s.get("kind"), s.get("name"), s.get("namespace")) for s in binding.get("subjects", [])}
    if ("ServiceAccount", sa["metadata"]["name"], sa["metadata"].get("namespace")) not in subj:
        errs.append("ClusterRoleBinding does not name the tweed ServiceAccount")


def check_configmap(cm, errs):
    data = cm.get("data", {})
    for key in ("etcd-endpoints", "net-conf.json", "10-tweed.conflist"):
        if key not in data:
            errs.append(f"ConfigMap {cm['metadata']['name']} lacks key {key}")
    try:
        net = json.loads(data.get("net-conf.json", ""))
        if "Network" not in net:
            errs.append("net-conf.json has no Network")
    except ValueError as e:
        errs.append(f"net-conf.json is not JSON: {e}")
    try:
        if json.loads(data.get("10-tweed.conflist", "")) != CONFLIST:
            errs.append(f"10-tweed.conflist is not {json.dumps(CONFLIST)}")
    except ValueError as e:
        errs.append(f"10-tweed.conflist is not JSON: {e}")


def volumes_by_name(spec):
    return {v["name"]: v for v in spec.get("volumes", [])}


def mount_source(spec, container, mount_path):
    """The volume behind mount_path in container, and the mount itself (or None, None)."""
    vols = volumes_by_name(spec)
    for m in container.get("volumeMounts", []):
        if m["mountPath"] == mount_path:
            return vols.get(m["name"]), m
    return None, None


def check_daemonset(ds, cm, raw_text, errs):
    spec = ds["spec"]["template"]["spec"]
    if spec.get("hostNetwork") is not True:
        errs.append("DaemonSet: hostNetwork is not true")
    if not any(t.get("operator") == "Exists" and not t.get("key") for t in spec.get("tolerations", [])):
        errs.append("DaemonSet: no toleration {operator: Exists} (without key): it would skip tainted nodes")
    if spec.get("priorityClassName") != "system-node-critical":
        errs.append("DaemonSet: priorityClassName is not system-node-critical")
    strat = ds["spec"].get("updateStrategy", {})
    if strat.get("type") != "RollingUpdate" or strat.get("rollingUpdate", {}).get("maxUnavailable") != 1:
        errs.append("DaemonSet: updateStrategy is not RollingUpdate with maxUnavailable 1")

    containers = {c["name"]: c for c in spec.get("containers", [])}
    c = containers.get("tweedd")
    if c is None:
        errs.append("DaemonSet: no container named tweedd")
        return
    args = c.get("args", [])
    cmdline = c.get("command", []) + args

    # privileges
    for cont in spec.get("containers", []) + spec.get("initContainers", []):
        sc = cont.get("securityContext") or {}
        if sc.get("privileged") is True:
            # allowed only when the manifest says why, on the same line
            if not re.search(r"^\s*privileged:\s*true\s*#\s*\S", raw_text, re.M):
                errs.append(f"container {cont['name']}: privileged without a comment saying why")
    caps = set(((c.get("securityContext") or {}).get("capabilities") or {}).get("add", []))
    for need in sorted(ALLOWED_CAPS - caps):
        errs.append(f"tweedd: capability {need} not added")
    for extra in sorted(caps - ALLOWED_CAPS):
        errs.append(f"tweedd: capability {extra} added beyond NET_ADMIN/NET_RAW")

    # probes and the metrics port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path or get.get("port") != PORT:
            errs.append(f"tweedd: {probe} is not httpGet {path} on port {PORT}")
    for a in args:
        if a.startswith("--metrics-addr") and not a.endswith(f":{PORT}"):
            errs.append(f"tweedd: {a} does not listen on the probed port {PORT}")
    req = (c.get("resources") or {}).get("requests") or {}
    if "cpu" not in req or "memory" not in req:
        errs.append("tweedd: resources.requests needs cpu and memory")

    # flags and environment
    if "--ip-masq" not in args:
        errs.append("tweedd: --ip-masq missing")
    env = {e["name"]: e for e in c.get("env", [])}
    pub = [a for a in args if a.startswith("--public-ip")]
    m = re.fullmatch(r"--public-ip[= ]\$\((\w+)\)", pub[0]) if pub else None
    if not m:
        errs.append("tweedd: no --public-ip=$(VAR)")
    elif (env.get(m.group(1), {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != "status.hostIP":
        errs.append(f"tweedd: {m.group(1)} does not come from status.hostIP")
    ref = (env.get("TWEED_ETCD_ENDPOINTS", {}).get("valueFrom") or {}).get("configMapKeyRef") or {}
    if ref.get("name") != cm["metadata"]["name"] or ref.get("key") not in cm.get("data", {}):
        errs.append("tweedd: TWEED_ETCD_ENDPOINTS does not come from a key of the tweed ConfigMap")

    # etcd TLS from a secret, at the paths the flags name
    vol, mnt = mount_source(spec, c, "/etc/tweed/etcd")
    if not vol or "secret" not in vol:
        errs.append("tweedd: /etc/tweed/etcd is not a Secret volume")
    for flag, fname in (("--etcd-cafile", "ca.crt"), ("--etcd-certfile", "tls.crt"), ("--etcd-keyfile", "tls.key")):
        if f"{flag}=/etc/tweed/etcd/{fname}" not in args:
            errs.append(f"tweedd: {flag}=/etc/tweed/etcd/{fname} missing")

    # host mounts
    for path, (host, ro) in HOST_MOUNTS.items():
        vol, mnt = mount_source(spec, c, path)
        if not vol:
            errs.append(f"tweedd: {path} not mounted")
            continue
        if (vol.get("hostPath") or {}).get("path") != host:
            errs.append(f"tweedd: {path} is not hostPath {host}")
        if ro and not mnt.get("readOnly"):
            errs.append(f"tweedd: {path} must be mounted read-only")

    # the binary really is tweedd
    if not cmdline or not cmdline[0].endswith("/tweedd"):
        errs.append("tweedd: command is not tweedd")

    # init containers install the plugin binary and the conflist
    inits = spec.get("initContainers", [])

    def installs(host_dir, target, source_check):
        for ic in inits:
            script = " ".join(ic.get("command", []) + ic.get("args", []))
            for m in ic.get("volumeMounts", []):
                vol = volumes_by_name(spec).get(m["name"]) or {}
                if (vol.get("hostPath") or {}).get("path") != host_dir:
                    continue
                dest = m["mountPath"].rstrip("/") + "/" + target
                if re.search(re.escape(dest) + r"(\s|$)", script) and source_check(ic, script):
                    return True
        return False

    def plugin_source(ic, script):
        return "/usr/local/bin/tweed " in script + " " and ic.get("image") == c.get("image")

    def conflist_source(ic, script):
        for m in ic.get("volumeMounts", []):
            vol = volumes_by_name(spec).get(m["name"]) or {}
            cmref = vol.get("configMap") or {}
            if cmref.get("name") == cm["metadata"]["name"]:
                items = {i["key"]: i["path"] for i in cmref.get("items", [])} or {
                    k: k for k in cm.get("data", {})
                }
                if "10-tweed.conflist" in items and (
                    m["mountPath"].rstrip("/") + "/" + items["10-tweed.conflist"]
                ) in script:
                    return True
        return False

    if not installs("/opt/cni/bin", "tweed", plugin_source):
        errs.append("no init container copies /usr/local/bin/tweed to the host's /opt/cni/bin/tweed")
    if not installs("/etc/cni/net.d", "10-tweed.conflist", conflist_source):
        errs.append("no init container copies the ConfigMap's conflist to /etc/cni/net.d/10-tweed.conflist")


def check(docs, raw_text):
    errs = []
    check_rbac(docs, errs)
    cm = one(docs, "ConfigMap", errs)
    ds = one(docs, "DaemonSet", errs)
    if cm:
        check_configmap(cm, errs)
    if cm and ds:
        check_daemonset(ds, cm, raw_text, errs)
    return errs


def ds_spec(docs):
    return find(docs, "DaemonSet")[0]["spec"]["template"]["spec"]


def tweedd(docs):
    return [c for c in ds_spec(docs)["containers"] if c["name"] == "tweedd"][0]


# Each mutation breaks one invariant; the self-test fails if check() does not notice.
def _privileged(d):
    tweedd(d)["securityContext"]["privileged"] = True


def _drop_raw(d):
    tweedd(d)["securityContext"]["capabilities"]["add"].remove("NET_RAW")


def _sys_admin(d):
    tweedd(d)["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")


def _no_hostnet(d):
    ds_spec(d)["hostNetwork"] = False


def _probe_port(d):
    tweedd(d)["readinessProbe"]["httpGet"]["port"] = 8080


def _probe_path(d):
    tweedd(d)["livenessProbe"]["httpGet"]["path"] = "/readyz"


def _surge(d):
    find(d, "DaemonSet")[0]["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] = 2


def _tolerations(d):
    ds_spec(d)["tolerations"] = [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]


def _priority(d):
    del ds_spec(d)["priorityClassName"]


def _no_modules(d):
    tweedd(d)["volumeMounts"] = [m for m in tweedd(d)["volumeMounts"] if m["mountPath"] != "/lib/modules"]


def _modules_rw(d):
    for m in tweedd(d)["volumeMounts"]:
        if m["mountPath"] == "/lib/modules":
            m["readOnly"] = False


def _no_lock(d):
    tweedd(d)["volumeMounts"] = [m for m in tweedd(d)["volumeMounts"] if m["mountPath"] != "/run/xtables.lock"]


def _no_plugin_init(d):
    ds_spec(d)["initContainers"] = [i for i in ds_spec(d)["initContainers"] if "conflist" in str(i)]


def _no_conf_init(d):
    ds_spec(d)["initContainers"] = [i for i in ds_spec(d)["initContainers"] if "conflist" not in str(i)]


def _conflist(d):
    find(d, "ConfigMap")[0]["data"]["10-tweed.conflist"] = '{"cniVersion":"1.0.0","name":"tweed","plugins":[{"type":"tweed"}]}'


def _rbac_write(d):
    find(d, "ClusterRole")[0]["rules"] = [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}]


def _no_masq(d):
    tweedd(d)["args"].remove("--ip-masq")


def _public_ip(d):
    for e in tweedd(d)["env"]:
        if e["name"] == "HOST_IP":
            e["valueFrom"]["fieldRef"]["fieldPath"] = "status.podIP"


def _endpoints(d):
    tweedd(d)["env"] = [e for e in tweedd(d)["env"] if e["name"] != "TWEED_ETCD_ENDPOINTS"]


def _tls(d):
    tweedd(d)["args"] = [a for a in tweedd(d)["args"] if not a.startswith("--etcd-keyfile")]


MUTATIONS = [v for k, v in sorted(globals().items()) if k.startswith("_") and callable(v) and k != "__loader__"]


def self_test(docs, raw_text):
    failures = 0
    base = check(docs, raw_text)
    if base:
        print("self-test: the unmodified manifest already fails:", *base, sep="\n  ")
        return 1
    for mutate in MUTATIONS:
        d = copy.deepcopy(docs)
        mutate(d)
        errs = check(d, raw_text)
        if not errs:
            print(f"self-test: mutation {mutate.__name__} went unnoticed")
            failures += 1
    print(f"self-test: {len(MUTATIONS) - failures} of {len(MUTATIONS)} broken variants caught")
    return 1 if failures else 0


def main(argv):
    selftest = "--self-test" in argv
    paths = [a for a in argv if a != "--self-test"] or [os.path.join(HERE, "tweed.yaml")]
    status = 0
    for path in paths:
        with open(path) as f:
            raw = f.read()
        docs = [d for d in yaml.safe_load_all(raw) if d]
        if selftest:
            status |= self_test(docs, raw)
            continue
        errs = check(docs, raw)
        for e in errs:
            print(f"{path}: {e}")
        if errs:
            status = 1
        else:
            print(f"{path}: all invariants hold")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
