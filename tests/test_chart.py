"""The Helm chart (charts/pdgate) rendered and linted by the real Helm engine (Helm v4's Go SDK
through helm-python-sdk), over a matrix of values: every manifest validated against the
Kubernetes 1.31 schemas (kubernetes-validate, strict; ServiceMonitor is a Prometheus Operator CRD
with no schema there, so that kind alone is skipped), every rendered gateway config run through the
real `pdgate serve --check`, and the things that keep a deployment up asserted one by one.

Also: the container image's Dockerfile builds with the README's cargo command and copies the
binary that command produces."""

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, _binary

CHART = ROOT / "charts" / "pdgate"
KUBE_VERSION = "1.31.0"
RELEASE, NAMESPACE = "llm", "inference"
#: A CRD (monitoring.coreos.com/v1): kubernetes-validate carries core schemas only.
UNVALIDATED_KINDS = {"ServiceMonitor"}


def _example(name: str) -> dict:
    return yaml.safe_load((CHART / "examples" / name).read_text())


ALL_ON = {
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
    "podDisruptionBudget": {"enabled": True},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    "networkPolicy": {
        "enabled": True,
        "ingressFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
        "extraTransferPorts": [{"port": 20000, "endPort": 20100}],
    },
    "apiKeys": {"keys": ["sk-one", "sk-two"]},
}

MATRIX = {
    "default": {},
    "all-optional-on": ALL_ON,
    "static-workers": {
        "workerGroups": [],
        "gateway": {
            "workers": [
                {"url": "http://10.0.0.5:30000", "role": "prefill", "protocol": "sglang", "bootstrapPort": 8998},
                {"url": "http://10.0.0.6:30000", "role": "decode", "protocol": "sglang"},
            ]
        },
        "networkPolicy": {"enabled": True},
    },
    "vllm-nixl": _example("vllm-nixl.yaml"),
    "vllm-mooncake": {
        "workerGroups": [
            {
                "model": "Llama-3.1-8B",
                "engine": "vllm",
                "modelPath": "meta-llama/Llama-3.1-8B",
                "vllm": {"connector": "mooncake"},
            }
        ],
        "networkPolicy": {"enabled": True},
    },
    "sglang": {**_example("sglang.yaml"), "networkPolicy": {"enabled": True}},
    "reference": _example("reference.yaml"),
    "two-models": _example("two-models.yaml"),
}


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.fixture(scope="module", params=sorted(MATRIX))
def case(request):
    return request.param, MATRIX[request.param], render(MATRIX[request.param])


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def gateway_deployment(docs):
    (d,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    return d


def engine_deployments(docs):
    return [d for d in of_kind(docs, "Deployment") if "pdgate.io/role" in d["metadata"]["labels"]]


def gateway_toml(docs) -> str:
    (cm,) = of_kind(docs, "ConfigMap")
    return cm["data"]["pdgate.toml"]


# --- Helm's own checks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_lint_is_clean_in_strict_mode(name):
    report = helm.lint(CHART, MATRIX[name], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize(
    "values, where",
    [
        ({"replicaCount": "three"}, "/replicaCount"),
        ({"service": {"port": "http"}}, "/service/port"),
        ({"autoscaling": {"enabled": "yes"}}, "/autoscaling/enabled"),
        ({"replicas": 3}, "'replicas' not allowed"),
        ({"workerGroups": [{"model": "m", "engine": "tgi"}]}, "/workerGroups/0/engine"),
        ({"workerGroups": [{"model": "m", "engine": "vllm"}]}, "modelPath"),
        ({"workerGroups": [{"model": "m", "engine": "vllm", "modelPath": "x", "vllm": {"connector": "lmcache"}}]}, "connector"),
        ({"gateway": {"workers": [{"url": "grpc://x:1", "role": "prefill"}]}}, "/gateway/workers/0/url"),
        ({"fleetSecret": {"value": "short"}}, "/fleetSecret/value"),
    ],
)
def test_the_schema_refuses_bad_values(values, where):
    with pytest.raises(helm.HelmValuesError) as e:
        render(values)
    assert where in str(e.value), str(e.value)


# --- Kubernetes' schemas ----------------------------------------------------------------------


def test_every_manifest_is_valid_kubernetes_1_31(case):
    name, _, docs = case
    assert docs, name
    for d in docs:
        if d["kind"] in UNVALIDATED_KINDS:
            assert d["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)


# --- The gateway config, through the real binary ----------------------------------------------


def test_the_rendered_gateway_config_passes_pdgate_serve_check(case, tmp_path):
    name, _, docs = case
    toml_text = gateway_toml(docs)
    # The files the pod mounts, at the paths the config names, re-rooted under tmp_path.
    secret_dir = tmp_path / "fleet"
    secret_dir.mkdir()
    (secret_dir / "fleet-secret").write_text("chart-test-fleet-secret-0123456789\n")
    keys_dir = tmp_path / "api-keys"
    keys_dir.mkdir()
    (keys_dir / "api-keys").write_text("sk-one\nsk-two\n")
    text = toml_text.replace("/etc/pdgate/fleet", str(secret_dir)).replace("/etc/pdgate/api-keys", str(keys_dir))
    cfg = tmp_path / "pdgate.toml"
    cfg.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDGATE_")}
    # As the Deployment gives it, from the admin Secret.
    env["PDGATE_SERVER__ADMIN_TOKEN"] = "chart-test-admin-token"
    out = subprocess.run([_binary(), "serve", "--config", str(cfg), "--check"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{name}:\n{text}\n{out.stderr}"
    effective = tomllib.loads(out.stdout)
    assert effective["server"]["host"] == "0.0.0.0"
    assert effective["server"]["admin_token"] == "<redacted>"
    assert "chart-test-admin-token" not in out.stdout
    groups = effective_groups(name)
    if len(groups) > 1:
        assert "model" not in effective or effective["model"]["name"] == "pdgate-sim-8b"
        assert effective["discovery"]["kind"] == "static", "each model discovers its own engines"
        assert [m["name"] for m in effective["models"]] == [g["model"] for g in groups]
        for g, m in zip(groups, effective["models"]):
            label = re.sub(r"[^a-z0-9.-]+", "-", g["model"].lower()).strip("-.")
            assert m.get("aliases", []) == g.get("aliases", [])
            assert m["discovery"]["kind"] == "kubernetes"
            k = m["discovery"]["kubernetes"]
            assert k["namespace"] == NAMESPACE
            for role in ("prefill", "decode"):
                assert k[f"{role}_selector"] == f"pdgate.io/role={role},pdgate.io/model={label},app.kubernetes.io/instance={RELEASE}"
            if "scheduler" in g:
                assert _within(g["scheduler"], m["scheduler"]), m["scheduler"]
                assert m["scheduler"]["block_size"] == effective["scheduler"]["block_size"], "merged over [scheduler]"
            else:
                assert "scheduler" not in m, "a model without its own scheduler uses [scheduler]"
    elif groups:
        (g,) = groups
        k = effective["discovery"]["kubernetes"]
        model = re.sub(r"[^a-z0-9.-]+", "-", g["model"].lower()).strip("-.")
        assert effective["discovery"]["kind"] == "kubernetes"
        assert k["namespace"] == NAMESPACE
        for role in ("prefill", "decode"):
            assert k[f"{role}_selector"] == f"pdgate.io/role={role},pdgate.io/model={model},app.kubernetes.io/instance={RELEASE}"
        assert effective["model"]["name"] == g["model"]
    else:
        assert effective["discovery"]["kind"] == "static"
        assert [w["url"] for w in effective["workers"]] == [w["url"] for w in MATRIX[name]["gateway"]["workers"]]
        assert effective["workers"][0]["bootstrap_port"] == 8998


def _within(part, whole) -> bool:
    """Every key of `part` is in `whole` with that value (nested tables compared the same way)."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and _within(v, whole[k]) for k, v in part.items())
    return part == whole


def effective_groups(name):
    values = MATRIX[name]
    if "workerGroups" in values:
        return values["workerGroups"]
    return yaml.safe_load((CHART / "values.yaml").read_text())["workerGroups"]


def test_two_groups_of_one_model_are_refused_at_render():
    group = {"model": "m", "engine": "reference"}
    with pytest.raises(Exception) as e:
        render({"workerGroups": [group, {**group, "aliases": ["x"]}]})
    assert "used twice" in str(e.value), str(e.value)


def test_a_wrong_gateway_config_key_is_caught_by_check(tmp_path):
    docs = render({"gateway": {"config": {"server": {"drain_secs": 30, "drain_sec": 5}}}})
    cfg = tmp_path / "pdgate.toml"
    cfg.write_text(gateway_toml(docs))
    out = subprocess.run([_binary(), "serve", "--config", str(cfg), "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "drain_sec" in out.stderr, out.stderr


# --- What keeps a deployment up ---------------------------------------------------------------


def test_gateway_probes_security_and_drain(case):
    _, _, docs = case
    dep = gateway_deployment(docs)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["port"] == c["livenessProbe"]["httpGet"]["port"] == "http"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    drain = tomllib.loads(gateway_toml(docs).split("\n", 1)[1])["server"]["drain_secs"]
    assert pod["terminationGracePeriodSeconds"] > drain
    envs = {e["name"]: e for e in c["env"]}
    assert "secretKeyRef" in envs["PDGATE_SERVER__ADMIN_TOKEN"]["valueFrom"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/etc/pdgate/fleet" in mounts


def test_the_role_only_reads_pods(case):
    name, _, docs = case
    roles = of_kind(docs, "Role")
    if not effective_groups(name):
        assert roles == [], "no discovery, no API access"
        return
    (role,) = roles
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    (binding,) = of_kind(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    sa = gateway_deployment(docs)["spec"]["template"]["spec"]
    assert sa["automountServiceAccountToken"] is True
    assert binding["subjects"][0]["name"] == sa["serviceAccountName"]


def test_optional_resources_follow_their_switches():
    off = {d["kind"] for d in render({})}
    on = {d["kind"] for d in render(ALL_ON)}
    optional = {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "NetworkPolicy"}
    assert not (off & optional)
    assert optional <= on
    docs = render(ALL_ON)
    assert "replicas" not in gateway_deployment(docs)["spec"], "the HPA owns replicas"
    (keys,) = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"].endswith("-api-keys")]
    assert keys["data"]["api-keys"]


def container_args(dep):
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c.get("command", []) + c["args"], c


def kv_config(args):
    (flag,) = [a for a in args if a.startswith("--kv-transfer-config=")]
    return json.loads(flag.split("=", 1)[1])


@pytest.mark.parametrize("name", ["vllm-nixl", "vllm-mooncake", "sglang", "reference"])
def test_engines_carry_their_connector_flags_labels_and_annotations(name):
    docs = render(MATRIX[name])
    engines = engine_deployments(docs)
    assert sorted(d["metadata"]["labels"]["pdgate.io/role"] for d in engines) == ["decode", "prefill"]
    for dep in engines:
        role = dep["metadata"]["labels"]["pdgate.io/role"]
        tpl = dep["spec"]["template"]
        labels, ann = tpl["metadata"]["labels"], tpl["metadata"]["annotations"]
        assert labels["pdgate.io/role"] == role
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", labels["pdgate.io/model"])
        args, c = container_args(dep)
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        http_port = int(ann["pdgate.io/http-port"])
        assert {"name": "http", "containerPort": http_port, "protocol": "TCP"} in c["ports"]
        if name == "vllm-nixl":
            assert ann["pdgate.io/protocol"] == "vllm-nixl"
            assert kv_config(args) == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "$(POD_IP)"
            assert "pdgate.io/bootstrap-port" not in ann
            assert gpus == 1
        elif name == "vllm-mooncake":
            assert ann["pdgate.io/protocol"] == "vllm-mooncake"
            want = "kv_producer" if role == "prefill" else "kv_consumer"
            assert kv_config(args) == {"kv_connector": "MooncakeConnector", "kv_role": want}
            assert ("pdgate.io/bootstrap-port" in ann) == (role == "prefill")
        elif name == "sglang":
            assert ann["pdgate.io/protocol"] == "sglang"
            assert f"--disaggregation-mode={role}" in args
            assert "--disaggregation-bootstrap-port=8998" in args
            assert "--disaggregation-transfer-backend=mooncake" in args
            assert "--enable-metrics" in args
            assert ann.get("pdgate.io/bootstrap-port") == ("8998" if role == "prefill" else None)
            assert gpus == 1
        else:
            assert ann["pdgate.io/protocol"] == "native"
            assert args[:2] == ["engine", f"--role={role}"]
            assert "--host=$(POD_IP)" in args
            assert any(a.startswith("--registry=http://") for a in args)
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["PDGATE_ENGINE_FLEET_SECRET_FILE"] == "/etc/pdgate/fleet/fleet-secret"
            assert gpus is None
            assert c["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("name", ["vllm-nixl", "vllm-mooncake", "sglang", "reference"])
def test_network_policy_ports_match_the_engines(name):
    docs = render({**MATRIX[name], "networkPolicy": {"enabled": True, "extraTransferPorts": []}})
    (dep_p, dep_d) = sorted(engine_deployments(docs), key=lambda d: d["metadata"]["labels"]["pdgate.io/role"] != "prefill")
    _, c = container_args(dep_p)
    ann = dep_p["spec"]["template"]["metadata"]["annotations"]
    http = int(ann["pdgate.io/http-port"])
    bootstrap = int(ann["pdgate.io/bootstrap-port"]) if "pdgate.io/bootstrap-port" in ann else None
    transfer = sorted(p["containerPort"] for p in c["ports"] if p["name"] != "http" and not p["name"].startswith("kv-events"))
    events = [int(ann["pdgate.io/kv-events-port"]), int(ann["pdgate.io/kv-events-replay-port"])]
    policies = {p["metadata"]["name"]: p for p in of_kind(docs, "NetworkPolicy")}
    gw = policies[f"{RELEASE}-pdgate-gateway"]
    (eng,) = [p for n, p in policies.items() if n.endswith("-engines")]
    # gateway → engines: their HTTP port (and a prefill's bootstrap port), and their KV events.
    to_engines = [r for r in gw["spec"]["egress"] if r.get("to")]
    assert sorted(p["port"] for r in to_engines for p in r["ports"]) == sorted([http] + ([bootstrap] if bootstrap else []) + events)
    # engines take from the gateway those ports only, and from each other the transfer ports only.
    from_gw, from_engines = eng["spec"]["ingress"]
    assert from_gw["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert sorted(p["port"] for p in from_gw["ports"]) == sorted([http] + ([bootstrap] if bootstrap else []) + events)
    assert sorted(p["port"] for p in from_engines["ports"]) == transfer
    assert http not in transfer
    sel = eng["spec"]["podSelector"]["matchLabels"]
    for dep in (dep_p, dep_d):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in sel.items()), "the policy selects both roles' pods"


def events_config(args):
    flags = [a for a in args if a.startswith("--kv-events-config=")]
    return json.loads(flags[0].split("=", 1)[1]) if flags else None


@pytest.mark.parametrize("name", ["vllm-nixl", "vllm-mooncake", "sglang", "reference"])
def test_engines_publish_kv_events_where_discovery_finds_them(name):
    docs = render(MATRIX[name])
    for dep in engine_deployments(docs):
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        args, c = container_args(dep)
        cfg = events_config(args)
        assert ann["pdgate.io/kv-events-port"] == "5557" and ann["pdgate.io/kv-events-replay-port"] == "5558"
        assert cfg["publisher"] == "zmq"
        assert cfg["endpoint"] == "tcp://*:5557" and cfg["replay_endpoint"] == "tcp://*:5558"
        # SGLang turns events on by the flag; vLLM and the reference engine need the key.
        assert cfg.get("enable_kv_cache_events") is (None if name == "sglang" else True)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["kv-events"] == 5557 and ports["kv-events-rep"] == 5558
    off = render({**MATRIX[name], "workerDefaults": {"kvEvents": {"enabled": False}}})
    for dep in engine_deployments(off):
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        args, c = container_args(dep)
        assert "pdgate.io/kv-events-port" not in ann and events_config(args) is None
        assert not any(p["name"].startswith("kv-events") for p in c["ports"])


def test_the_reference_engine_publishes_with_the_charts_flag():
    """The flag the chart renders starts a real reference engine whose events socket answers."""
    import socket
    from conftest import _free_port

    pub, rep, http = _free_port(), _free_port(), _free_port()
    values = {**MATRIX["reference"], "workerDefaults": {"kvEvents": {"port": pub, "replayPort": rep}}}
    (dep, *_) = engine_deployments(render(values))
    args, _ = container_args(dep)
    (flag,) = [a for a in args if a.startswith("--kv-events-config=")]
    proc = subprocess.Popen(
        [_binary(), "engine", "--role", "prefill", "--port", str(http), flag],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        import time
        deadline = time.monotonic() + 20
        bound = set()
        while time.monotonic() < deadline and bound != {pub, rep}:
            assert proc.poll() is None, proc.stderr.read().decode()
            for port in (pub, rep):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        bound.add(port)
            time.sleep(0.1)
        assert bound == {pub, rep}, "the engine bound its KV event sockets where the chart says"
    finally:
        proc.kill()
        proc.wait()


# --- The container image ----------------------------------------------------------------------


def _readme_build_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy on Kubernetes", 1)[1].split("\n## ", 1)[0]
    (cmd,) = re.findall(r"^(cargo build [^\n]+)$", section, re.M)
    return cmd.strip()


def test_the_dockerfile_builds_as_the_readme_says_and_copies_that_binary():
    dockerfile = (ROOT / "Dockerfile").read_text()
    (build,) = re.findall(r"^RUN (cargo build [^\n]+)$", dockerfile, re.M)
    assert build == _readme_build_command()
    assert "--locked" in build.split() and "--release" in build.split()
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", dockerfile, re.M)
    (src, _dst) = re.findall(r"^COPY --from=build (\S+) (\S+)$", dockerfile, re.M)[0]
    (entry,) = re.findall(r"^ENTRYPOINT (.+)$", dockerfile, re.M)
    assert json.loads(entry) == [_dst]
    assert re.search(r"^USER (\d+)", dockerfile, re.M), "a numeric non-root user"
    assert int(re.search(r"^USER (\d+)", dockerfile, re.M).group(1)) != 0
    # Where that cargo command puts the binary: cargo's own layout, from cargo's metadata.
    meta = json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps", "--locked"], cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    bin_name = build.split("--bin", 1)[1].split()[0]
    bins = [t for p in meta["packages"] for t in p["targets"] if "bin" in t["kind"] and t["name"] == bin_name]
    assert len(bins) == 1, bins
    produced = Path(meta["target_directory"]).relative_to(meta["workspace_root"]) / "release" / bin_name
    assert src == f"{workdir}/{produced}"
    # The build context keeps what that build reads.
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    for needed in ["/Cargo.toml", "/Cargo.lock"] + [f"/{m}" for m in tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]]:
        assert needed not in ignored, needed
