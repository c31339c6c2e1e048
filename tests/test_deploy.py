"""deploy/: the container, Kubernetes and KServe files agree with the server and with the README."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import yaml

from serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile() -> dict[str, list[str]]:
    """Instruction -> arguments (continuation lines joined)."""
    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            out.setdefault(instruction, []).append(rest.strip())
    return out


def test_dockerfile_serves_the_repository_the_readme_mounts():
    d = _dockerfile()
    cmd = d["CMD"][-1]
    assert cmd == '["python", "-m", "serving", "--host", "0.0.0.0", "--port", "8000"]'
    assert d["EXPOSE"] == ["8000"] and "REFINER_SERVE_MODELS=/models" in d["ENV"]
    assert "COPY" in d and d["COPY"] == ["serving/ serving/"]  # the server alone: no refiner, no torch
    readme = (ROOT / "README.md").read_text()
    build = next(line for line in readme.splitlines() if line.startswith("docker build"))
    run = next(line for line in readme.splitlines() if line.startswith("docker run"))
    assert shlex.split(build)[2:4] == ["-f", "deploy/Dockerfile"]
    assert "-p 8000:8000" in run and re.search(r"-v \S+:/models(:ro)?", run)


def test_dockerfile_installs_what_serving_imports():
    """Every third-party module serving/ imports is installed in the image."""
    installs = " ".join(d for d in _dockerfile()["RUN"] if "pip install" in d).lower()
    modules = set()
    for path in (ROOT / "serving").glob("*.py"):
        modules |= set(re.findall(r"^\s*(?:from|import) ([a-z_]+)", path.read_text(), re.M))
    third_party = modules - set(sys.stdlib_module_names) - {"serving", "__future__"}
    package = {"PIL": "pillow", "onnxruntime": "${onnxruntime}", "pydantic_settings": "pydantic-settings", "prometheus_client": "prometheus-client",
               "multipart": "python-multipart", "starlette": "fastapi", "anyio": "fastapi", "grpc": "grpcio", "google": "protobuf"}  # fmt: skip
    missing = [m for m in sorted(third_party) if package.get(m, m).lower() not in installs]
    assert not missing, f"imported by serving/ but not installed in deploy/Dockerfile: {missing}"


def test_kubernetes_probes_ports_and_autoscaler():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text())}
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert container["args"][-2:] == ["--port", "8000"] and container["args"][:3] == ["python", "-m", "serving"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    key = next(e for e in container["env"] if e["name"] == "REFINER_SERVE_API_KEY")  # the restricted API's key, from a Secret
    assert key["valueFrom"]["secretKeyRef"]["name"] == "refiner-serve-key"
    assert env["REFINER_SERVE_MODELS"] == container["volumeMounts"][0]["mountPath"] == "/models"
    # Kubernetes kills after the grace period: the server's own hard deadline must come first
    settings = ServeSettings(drain_timeout_s=float(env["REFINER_SERVE_DRAIN_TIMEOUT_S"]))
    assert settings.hard_deadline_s + 2 < pod["terminationGracePeriodSeconds"]
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", docs["Deployment"]["metadata"]["name"])


def test_kserve_inference_service_uses_triton_on_the_repository():
    (doc,) = list(yaml.safe_load_all((ROOT / "deploy" / "kserve.yaml").read_text()))
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    model = doc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert model["storageUri"].endswith("/models")


def test_onnxruntime_build_follows_the_platform():
    """onnxruntime-gpu where its wheels exist (x86-64 Linux/Windows), the CPU build everywhere else; never both."""
    import tomllib

    from packaging.requirements import Requirement

    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    runtimes = [d for d in deps if d.name in ("onnxruntime", "onnxruntime-gpu")]
    for machine, system, wanted in (("x86_64", "linux", "onnxruntime-gpu"), ("AMD64", "win32", "onnxruntime-gpu"),
                                    ("arm64", "darwin", "onnxruntime"), ("x86_64", "darwin", "onnxruntime"), ("aarch64", "linux", "onnxruntime")):  # fmt: skip
        chosen = [d.name for d in runtimes if d.marker.evaluate({"platform_machine": machine, "sys_platform": system})]
        assert chosen == [wanted], (machine, system, chosen)
