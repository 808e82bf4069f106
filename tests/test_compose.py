"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine), so check that what
they say is real: every command parses with the real CLI, every GRADWATCH_ variable is a real
setting, the healthcheck hits a real route, and the API that binds 0.0.0.0 gets keys."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url

from typer.testing import CliRunner

from service.cli import app as cli_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
GRADWATCH = {name: svc for name, svc in SERVICES.items() if "build" in svc}


def parse(argv: list[str]) -> int:
    """Exit code of `gradwatch ARGS --help` with the real CLI: click parses every option first
    (an unknown command or option exits 2), then the eager --help exits 0 without running."""
    assert argv[0] == "gradwatch", argv
    return CliRunner().invoke(cli_app, [*argv[1:], "--help"]).exit_code


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return {k: str(v) for k, v in env.items()} if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_every_gradwatch_service_runs_a_real_cli_command() -> None:
    assert {"api", "worker", "migrate"} <= set(GRADWATCH)
    for name, service in GRADWATCH.items():
        assert parse(service["command"]) == 0, name
    assert SERVICES["api"]["command"][:2] == ["gradwatch", "serve"] and "--no-worker" in SERVICES["api"]["command"]
    assert SERVICES["worker"]["command"] == ["gradwatch", "worker"]
    assert SERVICES["migrate"]["command"] == ["gradwatch", "migrate"]


def test_an_unknown_option_would_be_caught() -> None:
    assert parse(["gradwatch", "serve", "--wrokers", "2"]) == 2
    assert parse(["gradwatch", "serv"]) == 2


def test_every_setting_named_is_a_real_setting_and_the_url_reaches_the_db_service() -> None:
    known = {f"GRADWATCH_{name.upper()}" for name in Settings.model_fields}
    for name, service in GRADWATCH.items():
        env = env_of(service)
        assert set(env) <= known, (name, set(env) - known)
        url = make_url(env["GRADWATCH_DATABASE_URL"])
        assert url.drivername == "postgresql+psycopg" and url.host == "db"
        db_env = env_of(SERVICES["db"])
        assert (url.username, url.password, url.database) == (
            db_env["POSTGRES_USER"], db_env["POSTGRES_PASSWORD"], db_env["POSTGRES_DB"])


def test_the_public_api_is_given_keys_and_workers_are_released_on_sigterm() -> None:
    api = SERVICES["api"]
    assert api["command"][api["command"].index("--host") + 1] == "0.0.0.0"
    # `serve` refuses a non-loopback host without keys: compose must demand them.
    assert "GRADWATCH_API_KEYS" in env_of(api) and ":?" in env_of(api)["GRADWATCH_API_KEYS"]
    assert SERVICES["worker"].get("stop_signal", "SIGTERM") == "SIGTERM"
    assert SERVICES["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_healthchecks_hit_real_routes() -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    paths = set(TestClient(create_app(Settings(database_url="sqlite:///:memory:"))).get("/openapi.json").json()["paths"])
    probe = " ".join(SERVICES["api"]["healthcheck"]["test"])
    path = re.search(r"127\.0\.0\.1:8000(/[a-z]+)", probe).group(1)
    assert path in paths


def test_dockerfile_installs_torch_first_and_ships_the_migrations() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    run = [l for l in lines if l.startswith("RUN pip install")]
    assert "torch==2.13.0" in run[0] and "-e ." in run[-1]
    copied = " ".join(l for l in lines if l.startswith("COPY"))
    for needed in ("alembic.ini", "alembic", "gradwatch", "models", "service", "pyproject.toml"):
        assert needed in copied
    cmd = shlex.split(re.sub(r"[\[\],]", " ", next(l for l in lines if l.startswith("CMD"))[3:]).replace('"', ""))
    assert parse(cmd) == 0
