"""Checks what scripts/helm-check.sh rendered: schemas, cross-references, example, dashboard.

helm-check.sh renders the chart (one file per value variant), the NOTES of each variant, and
the wrapper chart, into a work directory, then runs this file with the Python that has
kubernetes-validate. Each check prints one line, "PASS what" or "FAIL what: why"; the shell
script counts them. This file exits 0 whatever the checks found, and non-zero only when it
could not run at all.

Work directory layout (written by helm-check.sh):
  render/<variant>.yaml   helm template output of the chart
  notes/<variant>.txt     the rendered NOTES.txt of the same variant
  wrapper/<name>.yaml     helm template output of helm/tests/wrapper
  variants.txt            "<variant> <values file or ->" per line
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from kubernetes_validate import utils as kv


# The config.toml fields chatcache accepts, with their types and defaults. Unknown fields are an
# error in chatcache, so the rendered file must use exactly these names.
CONFIG_FIELDS = {
    "listen_addr": (str, "0.0.0.0:8080"),
    "admin_addr": (str, "0.0.0.0:9090"),
    "upstream_url": (str, "http://127.0.0.1:3000"),
    "database_url": (str, None),
    "database_url_file": (str, None),
    "framing": (str, "envelope"),
    "log_format": (str, "text"),
    "log_level": (str, "info"),
    "shutdown_grace_ms": (int, 30000),
}
CONFIG_TABLES = {
    "cache": {"max_messages_per_chat": 2048, "max_bytes_per_chat": 4194304,
              "max_bytes": 268435456, "hole_grace_ms": 250},
    "feed": {"linger_ms": 30000, "connect_timeout_ms": 5000},
    "authz": {"ttl_ms": 5000, "timeout_ms": 5000},
    "stream": {"ping_interval_ms": 15000, "subscriber_queue_events": 1024},
    "db": {"pool_max_size": 4, "connect_timeout_ms": 5000},
}

# Every metric chatcache exports, by type. The dashboard may use no other chatcache_ name.
COUNTERS = {
    "chatcache_catchup_total", "chatcache_db_reads_total", "chatcache_full_refreshes_total",
    "chatcache_hole_repairs_total", "chatcache_evictions_total",
    "chatcache_listen_reconnects_total", "chatcache_fail_open_total", "chatcache_authz_total",
    "chatcache_overflow_closes_total", "chatcache_proxied_requests_total",
    "chatcache_bad_notifies_total", "process_cpu_seconds_total",
}
GAUGES = {
    "chatcache_bytes_held", "chatcache_chats_held", "chatcache_subscribers", "chatcache_feeds",
    "process_resident_memory_bytes", "process_open_fds", "process_max_fds",
}

# Dashboard panels the chart promises: title -> a metric its queries must use.
REQUIRED_PANELS = {
    "Catch-up hit ratio": "chatcache_catchup_total",
    "DB reads by reason": "chatcache_db_reads_total",
    "Subscribers": "chatcache_subscribers",
    "Feeds": "chatcache_feeds",
    "Evictions": "chatcache_evictions_total",
    "Bytes held": "chatcache_bytes_held",
    "Chats held": "chatcache_chats_held",
    "LISTEN reconnects": "chatcache_listen_reconnects_total",
    "Fail-opens by reason": "chatcache_fail_open_total",
    "Authz results": "chatcache_authz_total",
    "Overflow closes": "chatcache_overflow_closes_total",
}

# What coder's chart hard-codes for its container (helm/coder/templates/_coder.tpl upstream):
# CODER_HTTP_ADDRESS before the user's coder.env, the "http" port its Service targets, and the
# Prometheus and pprof listeners.
CODER_FIXED_ENV = [{"name": "CODER_HTTP_ADDRESS", "value": "0.0.0.0:8080"}]
CODER_HTTP_PORT = 8080
CODER_OTHER_PORTS = {2112, 6060}


class Report:
    """Collects results; one printed line per check."""

    def __init__(self):
        self.failed = 0

    def check(self, name, ok, why=""):
        if ok:
            print(f"PASS {name}")
        else:
            self.failed += 1
            print(f"FAIL {name}: {why}")
        sys.stdout.flush()
        return ok

    def run(self, name, fn, *args):
        """Runs fn; an AssertionError or any exception is this check's failure, not a crash."""
        try:
            fn(*args)
        except AssertionError as e:
            return self.check(name, False, str(e) or "assertion failed")
        except Exception as e:  # noqa: BLE001 - a check that blows up is a failed check
            return self.check(name, False, f"{type(e).__name__}: {e}")
        return self.check(name, True)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def index(docs):
    """kind -> list of documents."""
    out = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def one(kinds, kind):
    items = kinds.get(kind, [])
    assert len(items) == 1, f"expected one {kind}, found {len(items)}"
    return items[0]


def config_map(kinds):
    """The ConfigMap holding config.toml (the dashboard, when on, is a second ConfigMap)."""
    items = [c for c in kinds.get("ConfigMap", []) if "config.toml" in c.get("data", {})]
    assert len(items) == 1, f"expected one ConfigMap with config.toml, found {len(items)}"
    return items[0]


def header(values_file, key):
    """A '# key: value' line from the top comment block of a values file."""
    if values_file == "-":
        return None
    with open(values_file) as f:
        for line in f:
            if not line.startswith("#"):
                break
            m = re.match(rf"#\s*{re.escape(key)}:\s*(.*)$", line.strip())
            if m:
                return m.group(1).strip()
    return None


def notes_values_block(notes_path):
    """The values block NOTES.txt prints between its two marker lines, parsed. Holds `coder`
    and, for a non-native sidecar, `containers`."""
    with open(notes_path) as f:
        text = f.read()
    start = text.index("# ---- values for coder's chart ----\n")
    end = text.index("# ---- end ----", start)
    return yaml.safe_load(text[start:end])


def notes_sidecar(block):
    """(container, native) from a NOTES values block."""
    if "initContainers" in block["coder"]:
        return block["coder"]["initContainers"][0], True
    return block["containers"][0], False


def quantity_bytes(q):
    m = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, f"cannot read memory quantity {q!r}"
    mult = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
            "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    return int(float(m.group(1)) * mult)


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def authority(url):
    m = re.match(r"^[a-z]+://([^/]+)", url)
    assert m, f"not a URL: {url}"
    return m.group(1)


# --- Kubernetes schema validation -------------------------------------------------------------

def validate_k8s(doc, versions):
    """Validates one object against the bundled schemas of each version (strict: no unknown
    fields). ServiceMonitor is a CRD with no bundled schema; it is checked by hand instead."""
    for v in versions:
        try:
            kv.validate(doc, v, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            raise AssertionError(f"k8s {v}: {path}: {e.message}") from None


SM_SPEC_KEYS = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels",
                "podTargetLabels", "sampleLimit", "attachMetadata"}
SM_ENDPOINT_KEYS = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                    "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings",
                    "params", "tlsConfig", "bearerTokenSecret", "authorization", "followRedirects",
                    "enableHttp2", "filterRunning", "proxyUrl", "oauth2", "basicAuth"}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h))+$")


def seconds(d):
    total = 0.0
    for n, unit in re.findall(r"([0-9]+)(ms|s|m|h)", d):
        total += int(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def check_servicemonitor(sm, service):
    """Structural check of a ServiceMonitor (monitoring.coreos.com/v1) against its Service."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1", sm["apiVersion"]
    assert sm["metadata"].get("name") and sm["metadata"].get("namespace"), "name and namespace"
    spec = sm["spec"]
    assert set(spec) <= SM_SPEC_KEYS, f"unknown spec keys {set(spec) - SM_SPEC_KEYS}"
    wanted = spec["selector"]["matchLabels"]
    labels = service["metadata"]["labels"]
    missing = {k: v for k, v in wanted.items() if labels.get(k) != v}
    assert not missing, f"selector {missing} does not match Service labels"
    assert spec["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert spec["endpoints"], "no endpoints"
    for ep in spec["endpoints"]:
        assert set(ep) <= SM_ENDPOINT_KEYS, f"unknown endpoint keys {set(ep) - SM_ENDPOINT_KEYS}"
        assert ep["port"] in port_names, f"endpoint port {ep['port']} not in Service {port_names}"
        assert ep.get("path") == "/metrics", "path must be /metrics"
        for key in ("interval", "scrapeTimeout"):
            assert DURATION.match(ep[key]), f"{key} {ep[key]!r} is not a duration"
        assert seconds(ep["scrapeTimeout"]) < seconds(ep["interval"]), "timeout >= interval"
        for key in ("relabelings", "metricRelabelings"):
            assert isinstance(ep.get(key, []), list), f"{key} must be a list"


# --- The sidecar container -------------------------------------------------------------------

def check_hardened(c, native):
    sc = c["securityContext"]
    assert sc.get("runAsNonRoot") is True, "runAsNonRoot"
    assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, "numeric non-root user"
    assert sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem"
    assert sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation"
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities.drop ALL"
    assert not sc.get("capabilities", {}).get("add"), "no added capabilities"
    assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccomp RuntimeDefault"
    assert not sc.get("privileged"), "privileged"
    res = c["resources"]
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            assert r in res.get(kind, {}), f"resources.{kind}.{r} missing"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert set(ports) == {"chatcache-http", "chatcache-admin"}, f"ports {ports}"
    live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
    assert live == {"path": "/live", "port": "chatcache-admin"}, f"liveness {live}"
    assert ready == {"path": "/ready", "port": "chatcache-admin"}, f"readiness {ready}"
    assert "startupProbe" not in c, "a startup probe would hold coderd back (see _helpers.tpl)"
    assert c["command"] == ["/usr/local/bin/chatcache", "--config", "/etc/chatcache/config.toml"]
    assert (c.get("restartPolicy") == "Always") == native, f"restartPolicy for native={native}"
    for e in c.get("env", []):
        if e["name"] == "CHATCACHE_DATABASE_URL":
            assert "value" not in e, "the database URL must come from a Secret"
            assert e["valueFrom"]["secretKeyRef"]["name"], "secretKeyRef.name"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/chatcache"].get("readOnly") is True, "config mount read-only"
    assert all("subPath" not in m for m in c["volumeMounts"]), "subPath blocks ConfigMap updates"


def check_sidecar_against_chart(c, volumes, kinds, config, values_db_mode):
    """The container printed in NOTES fits the objects the same values render."""
    cm = config_map(kinds)
    by_name = {v["name"]: v for v in volumes}
    cfg_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/chatcache")
    vol = by_name[cfg_mount["name"]]
    assert vol["configMap"]["name"] == cm["metadata"]["name"], "volume names another ConfigMap"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["chatcache-http"] == port_of(config["listen_addr"]), "http port vs listen_addr"
    assert ports["chatcache-admin"] == port_of(config["admin_addr"]), "admin port vs admin_addr"
    env = {e["name"]: e for e in c.get("env", [])}
    if values_db_mode == "file":
        assert "CHATCACHE_DATABASE_URL" not in env, "file mode must not also set the env var"
        path = config.get("database_url_file")
        assert path, "file mode needs database_url_file"
        db_mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        secret = by_name[db_mount["name"]]["secret"]
        assert [i["path"] for i in secret["items"]] == [os.path.basename(path)], "secret item"
        assert secret["defaultMode"] & 0o004, "the non-root user must be able to read the file"
    else:
        assert "CHATCACHE_DATABASE_URL" in env, "env mode needs CHATCACHE_DATABASE_URL"
        assert "database_url_file" not in config, "env mode must not set database_url_file"
    assert "database_url" not in config, "no plaintext database URL in the ConfigMap"
    svc = kinds.get("Service", [None])[0]
    if svc:
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f"Service targets unknown port {p['targetPort']}"


def pod_with(init_containers, containers, volumes):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
            "spec": {"initContainers": init_containers, "containers": containers,
                     "volumes": volumes}}


def check_pod_ports_unique(pod):
    names, numbers = [], []
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        for p in c.get("ports", []):
            names.append(p["name"])
            numbers.append(p["containerPort"])
    assert len(names) == len(set(names)), f"port names repeat across the pod: {names}"
    assert len(numbers) == len(set(numbers)), f"port numbers repeat across the pod: {numbers}"


# --- config.toml --------------------------------------------------------------------------------

def check_config(config):
    for key, value in config.items():
        if key in CONFIG_TABLES:
            assert isinstance(value, dict), f"[{key}] must be a table"
            unknown = set(value) - set(CONFIG_TABLES[key])
            assert not unknown, f"unknown fields in [{key}]: {unknown}"
            for k, v in value.items():
                assert isinstance(v, int) and not isinstance(v, bool), f"{key}.{k} must be an int"
        else:
            assert key in CONFIG_FIELDS, f"unknown top-level field {key}"
            assert isinstance(value, CONFIG_FIELDS[key][0]), f"{key} has the wrong type"
    assert config["framing"] in ("envelope", "array")
    assert config["log_format"] in ("text", "json")
    assert not ("database_url" in config and "database_url_file" in config)


def check_config_defaults(config):
    for key, (_, default) in CONFIG_FIELDS.items():
        if default is not None:
            assert config.get(key) == default, f"{key} = {config.get(key)!r}, default {default!r}"
    for table, fields in CONFIG_TABLES.items():
        for key, default in fields.items():
            got = config.get(table, {}).get(key)
            assert got == default, f"{table}.{key} = {got!r}, default {default!r}"


def check_config_with_binary(binary, toml_text, tmp):
    """chatcache --check-config on the rendered file. The URL's password must not be printed."""
    secret = "helmcheck-not-a-real-password"
    url = f"postgres://chatcache:{secret}@127.0.0.1:5432/coder"
    url_file = os.path.join(tmp, "database-url")
    with open(url_file, "w") as f:
        f.write(url)
    text = re.sub(r'(?m)^database_url_file = .*$', f'database_url_file = "{url_file}"', toml_text)
    path = os.path.join(tmp, "config.toml")
    with open(path, "w") as f:
        f.write(text)
    env = dict(os.environ)
    if "database_url_file" not in text:
        env["CHATCACHE_DATABASE_URL"] = url
    out = subprocess.run([binary, "--check-config", path], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr.strip()[-500:]}"
    assert secret not in out.stdout + out.stderr, "the database password was printed"


# --- Dashboard -------------------------------------------------------------------------------

def check_dashboard(path):
    with open(path) as f:
        dash = json.load(f)
    assert dash.get("uid") and dash.get("title"), "uid and title"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus", "datasource variable"
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    rects = []
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, f"{p['title']} off the grid"
        for (x, y, w, h, t) in rects:
            overlap = (g["x"] < x + w and x < g["x"] + g["w"]
                       and g["y"] < y + h and y < g["y"] + g["h"])
            assert not overlap, f"panels {t!r} and {p['title']!r} overlap"
        rects.append((g["x"], g["y"], g["w"], g["h"], p["title"]))
    queried = [p for p in panels if p["type"] != "row"]
    titles = {}
    for p in queried:
        titles.setdefault(p["title"], []).append(p)
        assert p["datasource"]["uid"] == "${datasource}", f"{p['title']}: fixed datasource"
        assert p.get("targets"), f"{p['title']}: no queries"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", f"{p['title']}: fixed datasource"
            check_expr(p["title"], t["expr"])
    for title, metric in REQUIRED_PANELS.items():
        assert title in titles, f"missing panel {title!r}"
        exprs = " ".join(t["expr"] for p in titles[title] for t in p["targets"])
        assert metric in exprs, f"panel {title!r} does not query {metric}"
    return dash


def check_expr(title, expr):
    for name in re.findall(r"\b((?:chatcache|process)_[a-z_]+)\b", expr):
        assert name in COUNTERS | GAUGES, f"{title}: unknown metric {name}"
        if name in COUNTERS:
            assert re.search(rf"(rate|increase)\(\s*{name}\b", expr), \
                f"{title}: counter {name} outside rate() or increase()"
        else:
            assert not re.search(rf"(rate|increase)\(\s*{name}\b", expr), \
                f"{title}: rate() of gauge {name}"
        assert re.search(rf'{name}\{{[^}}]*pod=~"\$pod"', expr), f"{title}: {name} ignores $pod"
    assert expr.count("(") == expr.count(")"), f"{title}: unbalanced parentheses"


# --- values.yaml documentation ---------------------------------------------------------------

def check_values_documented(path):
    """Every key in values.yaml has a comment on the line above it."""
    undocumented = []
    prev = ""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            stripped = line.strip()
            if not stripped:
                continue
            if re.match(r"^\s*[A-Za-z_][\w.-]*:", line) and not prev.startswith("#"):
                undocumented.append(f"{n}:{stripped}")
            prev = stripped
    assert not undocumented, "undocumented: " + ", ".join(undocumented[:10])


# --- Dockerfile ----------------------------------------------------------------------------

def check_dockerfile(root):
    with open(os.path.join(root, "Dockerfile")) as f:
        text = f.read()
    froms = re.findall(r"(?im)^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text)
    assert len(froms) >= 2, "multi-stage build expected"
    assert froms[-1][0] == "gcr.io/distroless/cc-debian12:nonroot", f"runtime image {froms[-1][0]}"
    builder = froms[0][0]
    assert "bookworm" in builder or builder.startswith("${"), \
        f"builder {builder} must be Debian 12 (bookworm) to match cc-debian12's glibc"
    users = re.findall(r"(?im)^USER\s+(\S+)", text)
    assert users and users[-1].split(":")[0] == "65532", "final USER must be numeric 65532"
    entry = re.findall(r"(?im)^ENTRYPOINT\s+(\[.*\])", text)
    assert entry, "exec-form ENTRYPOINT"
    assert json.loads(entry[-1]) == ["/usr/local/bin/chatcache", "--config",
                                     "/etc/chatcache/config.toml"], entry[-1]
    assert re.search(r"(?im)^COPY\s+--from=\S+\s+\S+\s+/usr/local/bin/chatcache\s*$", text), \
        "binary copied to /usr/local/bin/chatcache"
    with open(os.path.join(root, ".dockerignore")) as f:
        ignore = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    assert ignore[0] == "*", ".dockerignore should start from excluding everything"
    allowed = {l[1:].rstrip("/") for l in ignore if l.startswith("!")}
    for needed in ("Cargo.toml", "Cargo.lock", "src", "sim"):
        assert needed in allowed, f".dockerignore must let {needed} through"
    copied = set(re.findall(r"(?im)^COPY\s+(?!--from)(.+?)\s+\S+\s*$", text))
    for srcs in copied:
        for s in srcs.split():
            assert s.rstrip("/") in allowed, f"COPY {s} is excluded by .dockerignore"


# --- Main ------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--k8s", required=True, help="comma-separated Kubernetes versions")
    ap.add_argument("--binary", default="", help="chatcache binary for --check-config, optional")
    args = ap.parse_args()
    versions = args.k8s.split(",")
    chart = os.path.join(args.root, "helm", "chatcache")
    r = Report()

    def validator_rejects_junk():
        bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
               "data": {"a": "b"}, "speck": {}}
        try:
            validate_k8s(bad, versions)
        except AssertionError:
            return
        raise AssertionError("kubernetes-validate accepted an unknown field; it checks nothing")
    r.run("validator: strict mode rejects an unknown field", validator_rejects_junk)

    def binary_rejects_junk():
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "config.toml")
            with open(path, "w") as f:
                f.write("listen_adr = \"0.0.0.0:8080\"\n")
            out = subprocess.run([args.binary, "--check-config", path], capture_output=True,
                                 text=True, timeout=30)
            assert out.returncode != 0, "chatcache accepted an unknown field; the check is empty"
    if args.binary:
        r.run("binary: --check-config rejects an unknown field", binary_rejects_junk)

    variants = []
    with open(os.path.join(args.work, "variants.txt")) as f:
        for line in f:
            name, values_file = line.split()
            variants.append((name, values_file))

    notes_blocks = {}
    for name, values_file in variants:
        docs = load_docs(os.path.join(args.work, "render", f"{name}.yaml"))
        kinds = index(docs)
        expect = header(values_file, "expect-kinds")
        expected = sorted(expect.split(",")) if expect else ["ConfigMap", "Service"]
        r.check(f"{name}: renders {','.join(expected)}", sorted(kinds) == expected,
                f"rendered {sorted(kinds)}")
        for d in docs:
            what = f"{name}: {d['kind']}/{d['metadata']['name']}"
            if d["kind"] == "ServiceMonitor":
                print(f"NOTE {what}: no bundled schema for this CRD; checked structurally")
                r.run(f"{what} structure", check_servicemonitor, d, one(kinds, "Service"))
            else:
                r.run(f"{what} schema {'+'.join(versions)}", validate_k8s, d, versions)

        cm = config_map(kinds)
        toml_text = cm["data"]["config.toml"]
        config = {}
        try:
            config = tomllib.loads(toml_text)
        except Exception as e:  # noqa: BLE001
            r.check(f"{name}: config.toml parses", False, str(e))
        else:
            r.check(f"{name}: config.toml parses", True)
            r.run(f"{name}: config.toml fields", check_config, config)
            if name == "default":
                r.run(f"{name}: config.toml defaults equal chatcache's", check_config_defaults,
                      config)
            if args.binary:
                with tempfile.TemporaryDirectory() as tmp:
                    r.run(f"{name}: chatcache --check-config", check_config_with_binary,
                          args.binary, toml_text, tmp)

        block = None
        try:
            block = notes_values_block(os.path.join(args.work, "notes", f"{name}.txt"))
        except Exception as e:  # noqa: BLE001
            r.check(f"{name}: NOTES values block parses", False, f"{type(e).__name__}: {e}")
        if block is not None:
            notes_blocks[name] = block
            coder = block["coder"]
            c, native = notes_sidecar(block)
            r.check(f"{name}: NOTES sidecar placement follows sidecar.native",
                    native == (header(values_file, "native") != "false"),
                    f"native={native}")
            mode = header(values_file, "database") or "env"
            r.run(f"{name}: NOTES sidecar is hardened", check_hardened, c, native)
            r.run(f"{name}: NOTES sidecar fits the rendered objects", check_sidecar_against_chart,
                  c, coder["volumes"], kinds, config, mode)
            digest = hashlib.sha256(toml_text.encode()).hexdigest()
            got = coder["podAnnotations"]["chatcache/config-checksum"]
            r.check(f"{name}: NOTES checksum is config.toml's", got == digest, f"{got} != {digest}")
            coderd = {"name": "coder", "image": "coder",
                      "env": CODER_FIXED_ENV + coder.get("env", [])}
            pod = (pod_with([c], [coderd], coder["volumes"]) if native
                   else pod_with([], [coderd, c], coder["volumes"]))
            r.run(f"{name}: NOTES block as a Pod schema", validate_k8s, pod, versions)

        svc = kinds.get("Service", [None])[0]
        pdb = kinds.get("PodDisruptionBudget", [None])[0]
        if svc and pdb:
            r.check(f"{name}: PDB and Service select the same pods",
                    svc["spec"]["selector"] == pdb["spec"]["selector"]["matchLabels"],
                    "selectors differ")
        for dcm in kinds.get("ConfigMap", []):
            if "chatcache.json" in dcm.get("data", {}):
                def same_dashboard(dcm=dcm):
                    with open(os.path.join(chart, "dashboards", "chatcache.json")) as f:
                        want = json.load(f)
                    assert json.loads(dcm["data"]["chatcache.json"]) == want, "content differs"
                    label = header(values_file, "dashboard-label") or "grafana_dashboard=1"
                    k, v = label.split("=")
                    assert dcm["metadata"]["labels"].get(k) == v, f"label {label} missing"
                r.run(f"{name}: dashboard ConfigMap carries the dashboard", same_dashboard)

    # The default variant's memory limit holds the cache.
    def memory_fits():
        c, _ = notes_sidecar(notes_blocks["default"])
        limit = quantity_bytes(c["resources"]["limits"]["memory"])
        assert limit >= CONFIG_TABLES["cache"]["max_bytes"] + 128 * 2**20, \
            f"memory limit {limit} < max_bytes + 128Mi"
    r.run("default: memory limit >= cache.max_bytes + 128Mi", memory_fits)

    # The example for coder's chart is what the chart itself renders, and it is coherent.
    def example_matches_chart():
        with open(os.path.join(chart, "examples", "coder-values.yaml")) as f:
            example = yaml.safe_load(f)["coder"]
        notes = notes_blocks["default"]["coder"]
        ours = [c for c in example["initContainers"] if c["name"] == "chatcache"]
        assert len(ours) == 1, "one chatcache init container"
        assert ours[0] == notes["initContainers"][0], \
            "container differs from the chart's rendering (helm get notes prints the current one)"
        assert example["volumes"] == notes["volumes"], "volumes differ from the chart's rendering"
    r.run("example: sidecar equals the chart's rendering", example_matches_chart)

    def example_is_coherent():
        with open(os.path.join(chart, "examples", "coder-values.yaml")) as f:
            example = yaml.safe_load(f)["coder"]
        docs = index(load_docs(os.path.join(args.work, "render", "default.yaml")))
        config = tomllib.loads(config_map(docs)["data"]["config.toml"])
        env = CODER_FIXED_ENV + example["env"]
        effective = {}
        for e in env:  # the kubelet keeps the last of repeated names
            effective[e["name"]] = e.get("value")
        coder_addr = effective["CODER_HTTP_ADDRESS"]
        assert coder_addr == authority(config["upstream_url"]), \
            f"coderd listens on {coder_addr}, chatcache proxies to {config['upstream_url']}"
        assert coder_addr.startswith("127.0.0.1:"), "coderd should listen on loopback only"
        assert port_of(config["listen_addr"]) == CODER_HTTP_PORT, \
            "chatcache must take port 8080, which coder's Service targets"
        taken = {port_of(config["listen_addr"]), port_of(config["admin_addr"])}
        assert not taken & (CODER_OTHER_PORTS | {port_of(coder_addr)}), "port clash with coderd"
        coder = {"name": "coder", "image": "ghcr.io/coder/coder:v2",
                 "env": env, "ports": [{"name": "http", "containerPort": CODER_HTTP_PORT}]}
        pod = pod_with(example["initContainers"], [coder], example["volumes"])
        check_pod_ports_unique_but_8080(pod)
        validate_k8s(pod, versions)

    def check_pod_ports_unique_but_8080(pod):
        # coder's container declares 8080 and so does chatcache: one port, two declarations,
        # which the API server accepts. Names must still be unique.
        names = [p["name"] for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]
                 for p in c.get("ports", [])]
        assert len(names) == len(set(names)), f"port names repeat across the pod: {names}"
    r.run("example: coderd, chatcache and coder's Service line up", example_is_coherent)

    # The wrapper chart: the named templates used from a parent chart.
    for wname in sorted(os.listdir(os.path.join(args.work, "wrapper"))):
        docs = load_docs(os.path.join(args.work, "wrapper", wname))
        dep = one(index(docs), "Deployment")
        label = f"wrapper {wname[:-5]}"
        r.run(f"{label}: Deployment schema {'+'.join(versions)}", validate_k8s, dep, versions)
        spec = dep["spec"]["template"]["spec"]
        native = "initContainers" in spec
        sidecars = [c for c in spec.get("initContainers", []) + spec["containers"]
                    if c["name"] == "chatcache"]
        r.check(f"{label}: one sidecar, native={native}", len(sidecars) == 1, f"{len(sidecars)}")
        if sidecars:
            r.run(f"{label}: sidecar is hardened", check_hardened, sidecars[0], native)
            r.run(f"{label}: pod ports are unique", check_pod_ports_unique,
                  pod_with(spec.get("initContainers", []), spec["containers"], spec["volumes"]))

    dash_path = os.path.join(chart, "dashboards", "chatcache.json")
    r.run("dashboard: panels, queries, datasource variable, layout", check_dashboard, dash_path)

    def dashboard_matches_binary():
        # The names chatcache registers, read from its source (read only), against the names
        # the dashboard queries: a rename on either side shows up here.
        with open(os.path.join(args.root, "src", "metrics.rs")) as f:
            exported = set(re.findall(r'"(chatcache_[a-z_]+)"', f.read()))
        with open(dash_path) as f:
            used = set(re.findall(r"\b(chatcache_[a-z_]+)\b", f.read()))
        assert exported, "no chatcache_ metric names found in src/metrics.rs"
        assert not used - exported, \
            f"dashboard queries what chatcache does not export: {used - exported}"
        assert not exported - used, f"exported but on no panel: {exported - used}"
    if os.path.exists(os.path.join(args.root, "src", "metrics.rs")):
        r.run("dashboard: metric names match src/metrics.rs", dashboard_matches_binary)
    else:
        print("NOTE src/metrics.rs not found; dashboard metric names checked against the list only")
    r.run("values.yaml: every key documented", check_values_documented,
          os.path.join(chart, "values.yaml"))
    r.run("Dockerfile and .dockerignore agree with the chart", check_dockerfile, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
