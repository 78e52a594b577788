"""docker/: no Docker engine runs here, so the Dockerfiles and compose.yaml are parsed and
everything they reference is checked against the repository: files copied, the console script
and the CLI commands and options (through Click's command tree), ports, environment names,
service dependencies and volumes. Renaming a command, an option or an env variable fails here."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import typer
import yaml
from typer.exceptions import Exit, TyperException

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Variables the base images and tools define and read (python, pip, apt, huggingface_hub).
TOOL_ENV = {"PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "DEBIAN_FRONTEND", "PATH", "HF_HUB_OFFLINE"}
POSTGRES_IMAGE_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}  # postgres image docs


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def exec_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD arguments: JSON exec form, else shell words."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def env_assignments(args: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(args))


def cli_invocation(args: list[str]):
    """Parse ``finsentinel ARGS`` the way the CLI would, without running it: each group picks
    its subcommand, each command checks its options (unknown or missing ones raise). Typer
    vendors Click, so groups are told by their ``get_command``."""
    command = typer.main.get_command(app)
    ctx = command.make_context("finsentinel", list(args))
    while hasattr(command, "get_command"):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            assert command.invoke_without_command, f"{args}: {ctx.info_name} needs a command"
            break
        sub = command.get_command(ctx, rest[0])
        assert sub is not None, f"finsentinel has no command {rest[0]!r} (in {args})"
        ctx, command = sub.make_context(rest[0], rest[1:], parent=ctx), sub
    return ctx


def names_read_by_the_code() -> set[str]:
    found = set()
    for path in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "flows").rglob("*.py")]:
        found |= set(re.findall(r"[\"'](FINSENTINEL_[A-Z_]+)[\"']", path.read_text()))
    return found


def check_env_name(name: str, where: str) -> None:
    import prefect.settings

    if name.startswith("PREFECT_"):
        assert hasattr(prefect.settings, name), f"{where}: {name} is no Prefect setting"
    elif name.startswith("FINSENTINEL_"):
        assert name in names_read_by_the_code(), f"{where}: no code reads {name}"
    else:
        assert name in TOOL_ENV, f"{where}: unknown environment variable {name}"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_references_exist(dockerfile):
    steps = parse_dockerfile(DOCKER / dockerfile)
    keywords = [k for k, _ in steps]
    assert keywords[0] == "FROM" and "ENTRYPOINT" in keywords and "CMD" in keywords
    copied = set()
    for keyword, args in steps:
        if keyword == "COPY":  # the build context is the repository root (compose: ..)
            *sources, _target = shlex.split(args)
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile}: COPY {source}: not in the repo"
                copied.add(source.rstrip("/").removeprefix("./"))
        if keyword == "ENV":
            for name in env_assignments(args):
                check_env_name(name, dockerfile)
    # What `pip install .` needs and the packages the console script imports.
    assert {"pyproject.toml", "README.md", "pipeline", "flows", "prefect.yaml"} <= copied
    entrypoint = exec_form(dict(steps)["ENTRYPOINT"])
    assert entrypoint == ["finsentinel"]
    assert PYPROJECT["project"]["scripts"]["finsentinel"] == "pipeline.cli:main"
    with pytest.raises(Exit):  # --help: prints the help and exits 0
        cli_invocation(exec_form(dict(steps)["CMD"]))
    ports = [int(p) for k, a in steps if k == "EXPOSE" for p in a.split()]
    assert ports == [8501]


def test_gpu_image_installs_faiss_gpu_through_the_gpu_extra():
    steps = parse_dockerfile(DOCKER / "Dockerfile.gpu")
    assert dict(steps)["FROM"].startswith("nvidia/cuda:") and "runtime" in dict(steps)["FROM"]
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert "'.[gpu]'" in runs and "torch==2.13.0" in runs
    [faiss_gpu] = [r for r in PYPROJECT["project"]["optional-dependencies"]["gpu"]
                   if r.startswith("faiss-gpu")]
    assert f"'{faiss_gpu}'" in runs  # reinstalled after faiss-cpu is removed: the same spec
    assert runs.index("uninstall -y faiss-cpu") < runs.index("--force-reinstall")


def test_compose_services_run_real_commands(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker", "dashboard", "demo"} <= set(services)
    parsed = {}
    for name, service in services.items():
        if service.get("build"):
            assert service["build"]["context"] == ".."
            assert (DOCKER / ".." / service["build"]["dockerfile"]).resolve().is_file()
            parsed[name] = cli_invocation(service["command"])
    assert parsed["worker"].info_name == "serve"
    assert parsed["demo"].info_name == "demo"
    dashboard = parsed["dashboard"]
    assert dashboard.info_name == "dashboard" and dashboard.params["address"] == "0.0.0.0"
    # The dashboard publishes the port it is told to serve on.
    published = {int(p.split(":")[0]): int(p.split(":")[1])
                 for p in services["dashboard"]["ports"]}
    assert published == {dashboard.params["port"]: dashboard.params["port"]} == {8501: 8501}


def test_compose_ports_env_dependencies_and_volumes(compose):
    services = compose["services"]
    server = services["prefect-server"]
    argv = shlex.split(server["command"])
    port = int(argv[argv.index("--port") + 1])
    assert server["ports"] == [f"{port}:{port}"] and port == 4200
    assert f"localhost:{port}/api/health" in " ".join(server["healthcheck"]["test"])
    assert server["image"].startswith(f"prefecthq/prefect:{PYPROJECT_PREFECT()}-")
    for name, service in services.items():
        env = service.get("environment", {})
        for variable in env:
            if name == "postgres":
                assert variable in POSTGRES_IMAGE_ENV
            else:
                check_env_name(variable, f"service {name}")
        if "PREFECT_API_URL" in env:
            assert env["PREFECT_API_URL"] == f"http://prefect-server:{port}/api"
        if "FINSENTINEL_DB" in env:
            assert env["FINSENTINEL_DB"].startswith("postgresql://") and "@postgres:5432/" in \
                env["FINSENTINEL_DB"]
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"], f"{name}: volume {source} is not declared"
    for name in ("worker", "dashboard"):
        assert services[name]["environment"]["FINSENTINEL_WORKDIR"].startswith("/data/")
        assert "finsentinel-data:/data" in services[name]["volumes"]


def PYPROJECT_PREFECT() -> str:  # noqa: N802 - reads like the constant it stands for
    [pin] = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("prefect==")]
    return pin.removeprefix("prefect==")


def test_the_checks_catch_a_renamed_command_option_or_variable():
    with pytest.raises(AssertionError, match="no command 'serve-all'"):
        cli_invocation(["serve-all"])
    with pytest.raises(TyperException, match="No such option: --listen-port"):
        cli_invocation(["dashboard", "--listen-port", "8501"])
    with pytest.raises(AssertionError, match="no code reads FINSENTINEL_INBOXES"):
        check_env_name("FINSENTINEL_INBOXES", "test")
    with pytest.raises(AssertionError, match="no Prefect setting"):
        check_env_name("PREFECT_API_ADDRESS", "test")


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_the_image_keeps_its_data_on_its_volume_where_compose_puts_it(dockerfile, compose):
    """`docker run -v data:/data IMAGE serve` (no compose): the ledger, inbox, scores and
    models must be under the image's /data volume, not in /app, where they would go with the
    container; and at the same places compose gives the worker and the dashboard."""
    steps = parse_dockerfile(DOCKER / dockerfile)
    env = {}
    for keyword, args in steps:
        if keyword == "ENV":
            env.update(env_assignments(args))
    [volume] = [json.loads(a) for k, a in steps if k == "VOLUME"]
    paths = ("FINSENTINEL_WORKDIR", "FINSENTINEL_INDEXES", "FINSENTINEL_MODELS")
    for name in paths:
        assert name in env, f"{dockerfile}: {name} not set: it would default to a path in /app"
        assert any(env[name].startswith(v.rstrip("/") + "/") for v in volume), (name, volume)
    worker = compose["services"]["worker"]["environment"]
    assert {n: worker[n] for n in paths} == {n: env[n] for n in paths}


def test_compose_passes_the_job_settings_through_to_the_worker(compose):
    """The worker runs all five schedules; the settings an operator must or may give them
    (the sentiment model the 15-minute job needs, the index name, the inbox settle interval)
    reach it from the shell running compose, else the 15-minute job fails every run with no
    way to fix it but editing compose.yaml. Blank means unset to the jobs."""
    from pipeline.inbox import DEFAULT_SETTLE_SECONDS, SETTLE_ENV
    from pipeline.settings import INDEX_NAME_ENV, SENTIMENT_MODEL_ENV, JobSettings

    env = compose["services"]["worker"]["environment"]
    for name in (SENTIMENT_MODEL_ENV, INDEX_NAME_ENV, SETTLE_ENV):
        assert name in env, f"compose worker: {name} is not passed through"
        assert env[name].startswith(f"${{{name}:-"), env[name]
    defaults = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}
    settings = JobSettings.from_env(defaults)
    assert settings.sentiment_model is None and settings.index_name == "fraud"
    assert settings.workdir == Path("/data/work")
    assert float(defaults[SETTLE_ENV]) == DEFAULT_SETTLE_SECONDS
