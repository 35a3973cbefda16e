"""deploy/ is written for users and never run here: check that what it names exists.

Every command is a real ``sagabox`` subcommand (parsed by the CLI's own parser), every
``SAGABOX_*`` variable is one the settings code reads, every participant module can be
imported, and each kind of file carries the health checks, restarts and replicas the
docs promise.
"""

from __future__ import annotations

import configparser
import importlib.util
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from participants.examples import SERVICES
from sagabox.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SETTINGS_CODE = [*sorted((ROOT / "sagabox").rglob("*.py")), ROOT / "outbox_relay" / "failpoints.py"]
# env.str("NAME", ...), env.int(\n "NAME", ...), env.raw("NAME"): every variable a process reads.
READ = re.compile(r"\benv\.\w+\(\s*\"([A-Z0-9_]+)\"")
NAMED = re.compile(r"\bSAGABOX_[A-Z0-9_]+")


def settings_variables() -> set[str]:
    names = {f"SAGABOX_{m}" for path in SETTINGS_CODE for m in READ.findall(path.read_text())}
    names.add("SAGABOX_FAILPOINTS")  # outbox_relay/failpoints.py: VARIABLE
    return names


def yaml_documents(path: Path) -> list[Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: YAML parse skipped")
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def check_sagabox_argv(argv: Sequence[str], where: str) -> None:
    """``argv`` (without the program name) parses as a sagabox command; modules exist."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit:
        pytest.fail(f"{where}: not a sagabox command: {' '.join(argv)}")
    assert callable(args.handler), where
    if args.command == "participant":
        assert module_exists(args.module), f"{where}: no module {args.module}"


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def test_the_settings_code_is_read_for_variables() -> None:
    names = settings_variables()
    for expected in (
        "SAGABOX_DATABASE_URL",
        "SAGABOX_PARTICIPANT_DATABASE_URL",
        "SAGABOX_RELAY_DATABASE_URLS",
        "SAGABOX_AMQP_URL",
        "SAGABOX_UP_PARTICIPANT_DATABASE_URLS",
    ):
        assert expected in names


def test_every_variable_named_in_deploy_is_read_by_the_settings() -> None:
    known = settings_variables()
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        for name in NAMED.findall(path.read_text()):
            assert name.removesuffix("_FILE") in known, f"{path.relative_to(ROOT)}: {name}"


# --- Docker Compose ---------------------------------------------------------------


def compose() -> dict[str, Any]:
    [document] = yaml_documents(DEPLOY / "compose.yml")
    assert isinstance(document, dict)
    return document


def test_compose_runs_every_component_with_health_checks_and_replicas() -> None:
    services = compose()["services"]
    assert {"postgres", "rabbitmq", "orchestrator", "relay", *SERVICES} <= services.keys()
    components = ["orchestrator", "relay", *SERVICES]
    for name in components:
        service = services[name]
        check_sagabox_argv(service["command"], f"compose {name}")
        test = service["healthcheck"]["test"]
        assert test[:2] == ["CMD", "sagabox"] and test[-1] == "--check", name
        check_sagabox_argv(test[2:], f"compose {name} healthcheck")
        assert service["restart"] == "unless-stopped", name
        assert service["deploy"]["replicas"] == 2, name
        assert service["stop_signal"] == "SIGTERM", name
    for name in ("postgres", "rabbitmq"):
        assert services[name]["healthcheck"]["test"], name


def test_compose_migrates_first_as_one_shot_jobs() -> None:
    services = compose()["services"]
    migrations = {n: s for n, s in services.items() if n.startswith("migrate-")}
    assert set(migrations) == {f"migrate-{n}" for n in ("orchestrator", *SERVICES)}
    for name, service in migrations.items():
        check_sagabox_argv(service["command"], f"compose {name}")
        assert service["command"][:2] == ["db", "upgrade"] and service["restart"] == "no"
    for name in ("orchestrator", *SERVICES):
        wait = services[name]["depends_on"][f"migrate-{name}"]
        assert wait == {"condition": "service_completed_successfully"}, name
    assert set(migrations) <= services["relay"]["depends_on"].keys()


def test_compose_secrets_are_files_read_through_file_variables() -> None:
    document = compose()
    for name, secret in document["secrets"].items():
        assert (DEPLOY / secret["file"]).is_file(), name
    for name, service in document["services"].items():
        for variable, value in service.get("environment", {}).items():
            if "URL" in variable or "PASSWORD" in variable:
                assert variable.endswith("_FILE") and value.startswith("/run/secrets/"), name


# --- Kubernetes -------------------------------------------------------------------


def k8s_objects() -> Iterator[dict[str, Any]]:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for document in yaml_documents(path):
            assert isinstance(document, dict) and "kind" in document, path
            yield document


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def test_k8s_deployments_have_replicas_probes_and_resources() -> None:
    deployments = {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == "Deployment"}
    expected = {f"sagabox-{n}" for n in ("orchestrator", "relay", *SERVICES)}
    assert set(deployments) == expected
    for name, deployment in deployments.items():
        assert deployment["spec"]["replicas"] == 2, name
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 15, name
        [container] = pod["containers"]
        check_sagabox_argv(container["args"], f"k8s {name}")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[0] == "sagabox" and command[-1] == "--check", (name, probe)
            check_sagabox_argv(command[1:], f"k8s {name} {probe}")
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), name
        assert {"configMapRef": {"name": "sagabox-config"}} in container["envFrom"], name
        for variable in container["env"]:
            if "URL" in variable["name"]:
                assert variable["name"].endswith("_FILE"), (name, variable)


def test_k8s_migration_job_and_settings_objects() -> None:
    objects = list(k8s_objects())
    [job] = [o for o in objects if o["kind"] == "Job"]
    steps = containers(job["spec"]["template"]["spec"])
    upgrades = [c for c in steps if c["args"][:2] == ["db", "upgrade"]]
    assert len(upgrades) == 1 + len(SERVICES)
    for container in steps:
        check_sagabox_argv(container["args"], f"k8s job {container['name']}")
    kinds = {o["kind"]: o for o in objects}
    assert kinds["ConfigMap"]["metadata"]["name"] == "sagabox-config"
    secret = kinds["Secret"]
    assert secret["metadata"]["name"] == "sagabox-secrets"
    mounted = {
        Path(v["value"]).name
        for o in objects
        if o["kind"] in ("Deployment", "Job")
        for c in containers(o["spec"]["template"]["spec"])
        for v in c.get("env", [])
        if v["name"].endswith("_FILE")
    }
    assert mounted <= secret["stringData"].keys()


# --- systemd ----------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(_join_repeated_keys((DEPLOY / "systemd" / name).read_text()))
    return parser


def _join_repeated_keys(text: str) -> str:
    """systemd allows a key twice (ExecStart of a oneshot): number the repeats."""
    seen: dict[str, int] = {}
    lines = []
    for line in text.splitlines():
        if line.startswith("["):
            seen.clear()
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:
                lines.append(f"{key}#{seen[key]}={value}")
                continue
        lines.append(line)
    return "\n".join(lines)


def exec_lines(parser: configparser.ConfigParser, instance: str) -> list[list[str]]:
    service = parser["Service"]
    commands = [v for k, v in service.items() if k.split("#")[0] in ("ExecStart", "ExecStartPre")]
    out = []
    for command in commands:
        binary, *argv = command.replace("%i", instance).split()
        assert binary == "/opt/sagabox/bin/sagabox"
        out.append(argv)
    return out


@pytest.mark.parametrize(
    ("name", "instance"),
    [
        ("sagabox-orchestrator@.service", "1"),
        ("sagabox-relay@.service", "1"),
        *[("sagabox-participant@.service", s) for s in SERVICES],
    ],
)
def test_systemd_units_run_real_commands_and_stop_cleanly(name: str, instance: str) -> None:
    parser = unit(name)
    service = parser["Service"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= 15
    assert service["EnvironmentFile"].startswith("/etc/sagabox/")
    assert service["User"] == "sagabox"
    commands = exec_lines(parser, instance)
    assert [argv[-1] for argv in commands].count("--check") == 1
    for argv in commands:
        check_sagabox_argv(argv, f"{name} ({instance})")


@pytest.mark.parametrize(
    ("name", "instance"),
    [("sagabox-migrate-orchestrator.service", ""), ("sagabox-migrate@.service", "inventory")],
)
def test_systemd_migrations_are_one_shot_jobs_the_components_require(
    name: str, instance: str
) -> None:
    parser = unit(name)
    assert parser["Service"]["Type"] == "oneshot"
    commands = exec_lines(parser, instance)
    assert commands[0][:2] == ["db", "upgrade"]
    for argv in commands:
        check_sagabox_argv(argv, name)
    orchestrator = unit("sagabox-orchestrator@.service")["Unit"]
    assert "sagabox-migrate-orchestrator.service" in orchestrator["Requires"]
    assert "sagabox-migrate@%i.service" in unit("sagabox-participant@.service")["Unit"]["Requires"]


def test_the_checks_catch_a_wrong_command_a_wrong_module_and_an_unknown_variable() -> None:
    for argv in (["orchestrater"], ["relay", "--chek"], ["participant", "nosuch.module"]):
        with pytest.raises(pytest.fail.Exception if argv[0] != "participant" else AssertionError):
            check_sagabox_argv(argv, "test")
    assert "SAGABOX_NO_SUCH_SETTING" not in settings_variables()
