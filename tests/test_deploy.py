"""infra/deploy.sh --dry-run: every gcloud step printed, none run, no secret anywhere in the output.

A ``gcloud`` that records any call is put first on PATH, so these tests prove the dry run never
calls gcloud (they need no Google account, no credentials and no network, and pass where gcloud is
not installed at all).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.db import Database

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "infra" / "deploy.sh"
FAKE_KEY = '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----SECRETVALUE\\n"}\n'
FUNCTIONS = {  # deployed name -> entry point
    "register": "register",
    "send": "send",
    "deliver": "deliver",
    "on-event": "on_event",
    "prune": "prune",
}
# Which functions use PostgreSQL (read from the code: shared/instance.token_store() or database()).
USES_POSTGRES = {"register", "deliver", "prune"}
NO_POSTGRES = set(FUNCTIONS) - USES_POSTGRES  # send and on_event: Redis and the bus only
INTERNAL = {"deliver", "on-event", "prune"}  # called only by Eventarc / Cloud Scheduler
POOL_SIZE = inspect.signature(Database).parameters["size"].default  # connections one instance keeps


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    gcloud_calls: str
    build_dir: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def commands(self) -> list[list[str]]:
        """Every printed command ("+ ..." lines), split as a shell would."""
        return [shlex.split(line[2:]) for line in self.stdout.splitlines() if line.startswith("+ ")]

    def deploy(self, name: str) -> list[str]:
        found = [c for c in self.commands() if c[:4] == ["gcloud", "functions", "deploy", name]]
        assert len(found) == 1, f"expected one deploy of {name}, got {found}"
        return found[0]


def flag(command: list[str], name: str) -> str:
    values = [word.split("=", 1)[1] for word in command if word.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} appears {len(values)} times in {command}"
    return values[0]


def deploy_sh(tmp_path: Path, *args: str, env: dict[str, str] | None = None, gcloud_answers: str = "") -> Result:
    """Run deploy.sh with a ``gcloud`` that records its arguments and, by default, fails (exit 97):
    a dry run must never call it. ``gcloud_answers`` (shell ``case`` branches on "$*") makes it
    answer like Google's instead, for a real run."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    calls = tmp_path / "gcloud-calls"
    gcloud = fake_bin / "gcloud"
    answer = f'case "$*" in\n{gcloud_answers}esac\nexit 0\n' if gcloud_answers else "exit 97\n"
    gcloud.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\n{answer}')
    gcloud.chmod(0o755)
    build_dir = tmp_path / "build"
    full_env = {
        "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),  # no gcloud configuration or credentials of the user's
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"),
        "LANG": "C.UTF-8",
        **(env or {}),
    }
    completed = subprocess.run(
        ["bash", str(SCRIPT), "--build-dir", str(build_dir), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Result(
        completed.returncode,
        completed.stdout,
        completed.stderr,
        calls.read_text() if calls.exists() else "",
        build_dir,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Result:
    tmp_path = tmp_path_factory.mktemp("deploy")
    key = tmp_path / "fcm-key.json"
    key.write_text(FAKE_KEY)
    result = deploy_sh(
        tmp_path, "--project", "demo-p", "--region", "europe-west1", "--dry-run", "--fcm-key-file", str(key)
    )
    assert result.returncode == 0, result.output
    return result


def test_dry_run_never_calls_gcloud(dry_run: Result) -> None:
    assert dry_run.gcloud_calls == ""


def test_every_function_deployed_with_its_entry_point_and_trigger(dry_run: Result) -> None:
    for name, entry in FUNCTIONS.items():
        command = dry_run.deploy(name)
        assert "--gen2" in command
        assert flag(command, "runtime") == "python311"
        assert flag(command, "region") == "europe-west1"
        assert flag(command, "entry-point") == entry
        assert flag(command, "source") == str(dry_run.build_dir)
        assert flag(command, "service-account").endswith("@demo-p.iam.gserviceaccount.com")
        assert flag(command, "vpc-connector").endswith("/connectors/pushline-connector")
    for name in ("register", "send", "prune"):
        assert "--trigger-http" in dry_run.deploy(name)
    assert flag(dry_run.deploy("deliver"), "trigger-topic") == "pushline-jobs"
    assert flag(dry_run.deploy("on-event"), "trigger-topic") == "pushline-events"


def test_each_function_has_its_own_service_account(dry_run: Result) -> None:
    accounts = {flag(dry_run.deploy(name), "service-account") for name in FUNCTIONS}
    assert len(accounts) == len(FUNCTIONS)


def test_event_functions_retry_and_time_out_under_the_ack_deadline(dry_run: Result) -> None:
    for name in ("deliver", "on-event"):
        command = dry_run.deploy(name)
        assert "--retry" in command
        assert flag(command, "timeout") == "540s"
        assert flag(command, "trigger-service-account").startswith("pushline-trigger@")
    for name in ("register", "send", "prune"):
        assert "--retry" not in dry_run.deploy(name)


def test_sizing(dry_run: Result) -> None:
    deliver = dry_run.deploy("deliver")
    assert (flag(deliver, "cpu"), flag(deliver, "memory"), flag(deliver, "concurrency")) == ("1", "1Gi", "1")
    assert flag(deliver, "max-instances") == "6"
    assert flag(dry_run.deploy("register"), "max-instances") == "4"
    assert flag(dry_run.deploy("prune"), "max-instances") == "1"
    register = dry_run.deploy("register")
    assert (flag(register, "cpu"), flag(register, "memory"), flag(register, "concurrency")) == ("1", "512Mi", "80")
    assert "THREADS=8" in flag(register, "set-env-vars").split(",")
    assert flag(dry_run.deploy("send"), "concurrency") == "80"


def test_max_instances_flag(tmp_path: Path) -> None:
    result = deploy_sh(
        tmp_path, "--project", "demo-p", "--region", "europe-west1", "--dry-run",
        "--max-instances", "7", "--register-max-instances", "10", "--sql-max-connections", "200",
    )  # fmt: skip
    assert result.returncode == 0, result.output
    assert flag(result.deploy("deliver"), "max-instances") == "7"
    assert flag(result.deploy("register"), "max-instances") == "10"


def test_every_function_has_max_instances(dry_run: Result) -> None:
    for name in FUNCTIONS:
        assert int(flag(dry_run.deploy(name), "max-instances")) >= 1, name


def test_postgres_connections_stay_under_cloud_sql_max_connections(dry_run: Result) -> None:
    """Every instance of a PostgreSQL function may hold a pool's worth of connections (shared/db.py);
    together, with room for the migration, the CLI and PostgreSQL's reserved ones, under the default
    max_connections the script assumes (100)."""
    assert POOL_SIZE == 8
    total = sum(int(flag(dry_run.deploy(name), "max-instances")) * POOL_SIZE for name in USES_POSTGRES)
    assert total <= 100 - 10, total
    assert f"{total} of 100" in dry_run.stdout  # the script says what it budgeted


@pytest.mark.parametrize(
    "args",
    [
        ["--max-instances", "7"],  # (4 + 7 + 1) x 8 = 96 > 90
        ["--register-max-instances", "9"],
        ["--max-instances", "20", "--sql-max-connections", "150"],
    ],
)
def test_more_connections_than_cloud_sql_allows_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    result = deploy_sh(tmp_path, "--project", "demo-p", "--region", "europe-west1", "--dry-run", *args)
    assert result.returncode == 2, result.output
    assert "--sql-max-connections" in result.stderr and "PostgreSQL connections" in result.stderr
    assert "+ " not in result.stdout and result.gcloud_calls == ""


def test_event_functions_and_prune_take_internal_traffic_only(dry_run: Result) -> None:
    for name in FUNCTIONS:
        expected = "internal-only" if name in INTERNAL else "all"
        assert flag(dry_run.deploy(name), "ingress-settings") == expected, name


def test_deliver_is_deployed_before_the_functions_that_publish_jobs(dry_run: Result) -> None:
    order = [c[3] for c in dry_run.commands() if c[:3] == ["gcloud", "functions", "deploy"]]
    assert sorted(order) == sorted(FUNCTIONS)
    assert order.index("deliver") < order.index("send")
    assert order.index("deliver") < order.index("on-event")


def test_register_is_public_and_the_rest_are_not(dry_run: Result) -> None:
    register = dry_run.deploy("register")
    assert "--allow-unauthenticated" in register
    assert "--no-allow-unauthenticated" not in register
    for name in ("send", "prune"):
        command = dry_run.deploy(name)
        assert "--no-allow-unauthenticated" in command
        assert "--allow-unauthenticated" not in command
    for name in ("deliver", "on-event"):
        assert "--allow-unauthenticated" not in dry_run.deploy(name)


def test_stores_come_from_secrets_never_env_vars(dry_run: Result) -> None:
    for name in FUNCTIONS:
        command = dry_run.deploy(name)
        secrets = dict(item.split("=", 1) for item in flag(command, "set-secrets").split(","))
        expected = {"REDIS_URL": "pushline-redis-url:latest"}
        if name in USES_POSTGRES:
            expected["DATABASE_URL"] = "pushline-database-url:latest"
        assert secrets == expected, name
        env = dict(item.split("=", 1) for item in flag(command, "set-env-vars").split(","))
        assert "DATABASE_URL" not in env and "REDIS_URL" not in env
        assert env["GOOGLE_CLOUD_PROJECT"] == "demo-p"
        assert env["PUBSUB_TOPIC"] == "pushline-jobs"
    for line in dry_run.stdout.splitlines():
        for word in line.split():
            if word.startswith(("--set-env-vars", "--update-env-vars")):
                assert "DATABASE_URL" not in word and "REDIS_URL" not in word, line


def test_fcm_key_is_a_secret_path_read_from_the_operator_file(dry_run: Result) -> None:
    deliver_env = dict(item.split("=", 1) for item in flag(dry_run.deploy("deliver"), "set-env-vars").split(","))
    assert deliver_env["FCM_CREDENTIALS_SECRET"] == "projects/demo-p/secrets/pushline-fcm-key/versions/latest"
    creates = [c for c in dry_run.commands() if c[:3] == ["gcloud", "secrets", "create"]]
    assert len(creates) == 1
    assert flag(creates[0], "data-file").endswith("fcm-key.json")
    for name in ("register", "send", "on-event", "prune"):
        assert "FCM_CREDENTIALS_SECRET" not in flag(dry_run.deploy(name), "set-env-vars")
    # Only deliver may read the key.
    fcm_bindings = [
        c for c in dry_run.commands() if c[:4] == ["gcloud", "secrets", "add-iam-policy-binding", "pushline-fcm-key"]
    ]
    deliver = "serviceAccount:pushline-deliver@demo-p.iam.gserviceaccount.com"
    assert [flag(c, "member") for c in fcm_bindings] == [deliver]


def test_no_secret_value_anywhere_in_the_output(tmp_path: Path) -> None:
    """The operator's shell holds store URLs with a password, and the FCM key file a private key:
    none of it may reach the dry run's output."""
    key = tmp_path / "fcm-key.json"
    key.write_text(FAKE_KEY)
    result = deploy_sh(
        tmp_path,
        "--project=demo-p",
        "--region=europe-west1",
        "--dry-run",
        f"--fcm-key-file={key}",
        env={"DATABASE_URL": DATABASE_URL_WITH_PASSWORD, "REDIS_URL": f"redis://:{PASSWORD}@10.0.0.3:6379/0"},
    )
    assert result.returncode == 0, result.output
    for needle in (PASSWORD, "SECRETVALUE", "BEGIN PRIVATE KEY", "private_key", FAKE_KEY.strip()):
        assert needle.lower() not in result.output.lower(), needle


def test_dead_letters_on_the_event_subscriptions(dry_run: Result) -> None:
    commands = dry_run.commands()
    created_topics = {c[4] for c in commands if c[:4] == ["gcloud", "pubsub", "topics", "create"]}
    assert {"pushline-jobs", "pushline-events", "pushline-jobs-dead", "pushline-events-dead"} <= created_topics
    dead_subs = {c[4]: flag(c, "topic") for c in commands if c[:4] == ["gcloud", "pubsub", "subscriptions", "create"]}
    assert dead_subs == {
        "pushline-jobs-dead-sub": "pushline-jobs-dead",
        "pushline-events-dead-sub": "pushline-events-dead",
    }
    updates = [c for c in commands if c[:4] == ["gcloud", "pubsub", "subscriptions", "update"]]
    assert sorted(flag(c, "dead-letter-topic") for c in updates) == [
        "projects/demo-p/topics/pushline-events-dead",
        "projects/demo-p/topics/pushline-jobs-dead",
    ]
    for command in updates:
        assert flag(command, "max-delivery-attempts") == "100"
        assert flag(command, "ack-deadline") == "600"
        assert flag(command, "min-retry-delay") == "10s"
        assert flag(command, "max-retry-delay") == "600s"
        # a part may wait on the bus through its whole delivery window (at most 14 h): kept 7 days, not
        # Eventarc's default 24 h, so retention never discards one before its window closes
        assert flag(command, "message-retention-duration") == "7d"
    # The subscription is looked up at run time (Eventarc names it), shown but not run.
    lookups = [c for c in commands if c[:4] == ["gcloud", "eventarc", "triggers", "describe"]]
    assert len(lookups) == 2
    assert all(flag(c, "format") == "value(transport.pubsub.subscription)" for c in lookups)


def test_pubsub_service_agent_can_forward_dead_letters(dry_run: Result) -> None:
    agent = "serviceAccount:service-PROJECT_NUMBER@gcp-sa-pubsub.iam.gserviceaccount.com"
    commands = dry_run.commands()
    assert ["gcloud", "projects", "describe", "demo-p", "--format=value(projectNumber)"] in commands
    publishers = {
        c[4]
        for c in commands
        if c[:4] == ["gcloud", "pubsub", "topics", "add-iam-policy-binding"]
        and flag(c, "member") == agent
        and flag(c, "role") == "roles/pubsub.publisher"
    }
    assert publishers == {"pushline-jobs-dead", "pushline-events-dead"}
    subscribers = [
        c
        for c in commands
        if c[:4] == ["gcloud", "pubsub", "subscriptions", "add-iam-policy-binding"]
        and flag(c, "member") == agent
        and flag(c, "role") == "roles/pubsub.subscriber"
    ]
    assert len(subscribers) == 2


def test_least_privilege(dry_run: Result) -> None:
    commands = dry_run.commands()
    publishers = {
        flag(c, "member").split(":", 1)[1].split("@")[0]
        for c in commands
        if c[:5] == ["gcloud", "pubsub", "topics", "add-iam-policy-binding", "pushline-jobs"]
    }
    assert publishers == {"pushline-send", "pushline-deliver", "pushline-on-event"}
    fcm_role = [c for c in commands if c[:3] == ["gcloud", "iam", "roles"] and c[3] == "create"]
    assert flag(fcm_role[0], "permissions") == "cloudmessaging.messages.create"
    project_roles = [
        (flag(c, "member"), flag(c, "role"))
        for c in commands
        if c[:3] == ["gcloud", "projects", "add-iam-policy-binding"]
    ]
    deliver = "serviceAccount:pushline-deliver@demo-p.iam.gserviceaccount.com"
    assert (deliver, "projects/demo-p/roles/pushlineFcmSender") in project_roles
    assert {role for _, role in project_roles} == {"roles/cloudsql.client", "projects/demo-p/roles/pushlineFcmSender"}
    invokers = {
        (c[3], flag(c, "member").split(":", 1)[1].split("@")[0])
        for c in commands
        if c[:3] == ["gcloud", "functions", "add-invoker-policy-binding"]
    }
    assert invokers == {
        ("deliver", "pushline-trigger"),
        ("on-event", "pushline-trigger"),
        ("prune", "pushline-scheduler"),
    }


def _account(member: str) -> str:
    return member.split(":", 1)[1].split("@")[0].removeprefix("pushline-")


def test_only_postgres_functions_get_the_database(dry_run: Result) -> None:
    commands = dry_run.commands()
    sql_clients = {
        _account(flag(c, "member"))
        for c in commands
        if c[:3] == ["gcloud", "projects", "add-iam-policy-binding"] and flag(c, "role") == "roles/cloudsql.client"
    }
    assert sql_clients == USES_POSTGRES
    readers = {
        secret: {
            _account(flag(c, "member"))
            for c in commands
            if c[:4] == ["gcloud", "secrets", "add-iam-policy-binding", secret]
            and flag(c, "role") == "roles/secretmanager.secretAccessor"
        }
        for secret in ("pushline-database-url", "pushline-redis-url")
    }
    assert readers["pushline-database-url"] == USES_POSTGRES
    assert readers["pushline-redis-url"] == set(FUNCTIONS)
    # What an earlier deploy granted send and on_event is taken back.
    revoked = {
        (_account(flag(c, "member")), c[1])
        for c in commands
        if c[2] == "remove-iam-policy-binding"
        and (flag(c, "role") == "roles/cloudsql.client" or "pushline-database-url" in c)
    }
    assert revoked == {(name, kind) for name in NO_POSTGRES for kind in ("projects", "secrets")}


def test_cloud_sql_socket_only_on_postgres_functions(tmp_path: Path) -> None:
    result = deploy_sh(
        tmp_path, "--project=demo-p", "--region=europe-west1", "--dry-run", "--cloud-sql-instance=demo-p:eu:sql"
    )
    assert result.returncode == 0, result.output
    updated = {c[4] for c in result.commands() if c[:4] == ["gcloud", "run", "services", "update"]}
    assert updated == USES_POSTGRES


PASSWORD = "Pa55-w0rd-NEVER-PRINTED"
DATABASE_URL_WITH_PASSWORD = f"postgresql://pushline:{PASSWORD}@/pushline?unix_sock=/cloudsql/p:r:i/.s.PGSQL.5432"


def test_no_password_anywhere_in_a_real_run(tmp_path: Path) -> None:
    """A real run (no --dry-run) against a gcloud that answers like Google's, whose secret holds a
    DATABASE_URL with a password, with the operator's own store URLs in the environment too: the
    password reaches the migration and appears nowhere else: not in the output, not on a command line."""
    answers = (
        f'  "secrets versions access"*) printf "%s" {shlex.quote(DATABASE_URL_WITH_PASSWORD)} ;;\n'
        '  "projects describe"*) echo 123456 ;;\n'
        '  "functions describe prune"*) echo https://prune-x.a.run.app ;;\n'
        '  "functions describe"*) echo projects/demo-p/locations/europe-west1/triggers/t ;;\n'
        '  "eventarc triggers describe"*) echo projects/demo-p/subscriptions/s ;;\n'
    )
    seen = tmp_path / "migrate-saw"
    migrate = tmp_path / "python-migrate"  # stands in for the Python that runs shared.cli migrate
    migrate.write_text(f'#!/bin/sh\nprintf "%s" "$DATABASE_URL" > {shlex.quote(str(seen))}\necho migrated\n')
    migrate.chmod(0o755)
    result = deploy_sh(
        tmp_path,
        "--project=demo-p",
        "--region=europe-west1",
        env={
            "PYTHON": str(migrate),
            "DATABASE_URL": DATABASE_URL_WITH_PASSWORD,
            "REDIS_URL": f"redis://:{PASSWORD}@10.0.0.3:6379/0",
        },
        gcloud_answers=answers,
    )
    assert result.returncode == 0, result.output
    calls = tmp_path / "gcloud-calls"
    assert seen.read_text() == DATABASE_URL_WITH_PASSWORD  # the test exercised the path that holds it
    assert "gcloud functions deploy" in result.stdout
    assert PASSWORD not in result.stdout
    assert PASSWORD not in result.stderr
    assert PASSWORD not in calls.read_text()  # never an argument of any command
    assert PASSWORD not in "".join(p.read_text() for p in result.build_dir.rglob("*") if p.is_file())


def test_migration_reads_the_url_from_secret_manager_unexpanded(dry_run: Result) -> None:
    lines = [line for line in dry_run.stdout.splitlines() if "shared.cli migrate" in line]
    assert len(lines) == 1
    assert re.search(
        r'DATABASE_URL="\$\(gcloud secrets versions access latest --secret=pushline-database-url[^)]*\)" \S*python\S* '
        r"-m shared\.cli migrate$",
        lines[0],
    ), lines[0]
    # The schema is in place before any function starts.
    position = dry_run.stdout.index
    assert position("shared.cli migrate") < position("gcloud functions deploy")


def test_prune_runs_every_15_minutes(dry_run: Result) -> None:
    jobs = [c for c in dry_run.commands() if c[:5] == ["gcloud", "scheduler", "jobs", "create", "http"]]
    assert len(jobs) == 1
    job = jobs[0]
    assert job[5] == "pushline-prune"
    assert flag(job, "schedule") == "*/15 * * * *"  # prune, then a page of cache reconciliation
    assert flag(job, "oidc-service-account-email") == "pushline-scheduler@demo-p.iam.gserviceaccount.com"
    assert flag(job, "uri").startswith("https://")


def test_apis_enabled(dry_run: Result) -> None:
    enable = [c for c in dry_run.commands() if c[:3] == ["gcloud", "services", "enable"]]
    assert len(enable) == 1
    for api in (
        "cloudfunctions",
        "run",
        "cloudbuild",
        "artifactregistry",
        "eventarc",
        "pubsub",
        "secretmanager",
        "sqladmin",
        "redis",
        "vpcaccess",
        "cloudscheduler",
        "fcm",
        "firebase",
    ):
        assert f"{api}.googleapis.com" in enable[0], api


def test_package_holds_the_functions_and_nothing_local(dry_run: Result) -> None:
    build = dry_run.build_dir
    assert (build / "main.py").read_text() == (ROOT / "functions" / "main.py").read_text()
    assert (build / "shared" / "__init__.py").is_file()
    assert (build / "shared" / "config.py").read_text() == (ROOT / "shared" / "config.py").read_text()
    assert (build / "requirements.txt").read_text() == (ROOT / "requirements.txt").read_text()
    for absent in ("tests", "local", "bench", "functions", ".venv", ".run"):
        assert not (build / absent).exists(), absent
    assert not list(build.rglob("__pycache__"))
    assert not list(build.rglob("test_*.py"))


def test_rules_file_is_validated_then_packaged(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    checker = tmp_path / "python-ok"  # stands in for the Python that runs shared.cli check-rules
    checker.write_text(f'#!/bin/sh\necho "$@" > {shlex.quote(str(tmp_path / "checked"))}\nexit 0\n')
    checker.chmod(0o755)
    result = deploy_sh(
        tmp_path,
        "--project=demo-p",
        "--region=europe-west1",
        "--dry-run",
        "--rules-file",
        str(rules),
        env={"PYTHON": str(checker)},
    )
    assert result.returncode == 0, result.output
    assert (tmp_path / "checked").read_text().split() == ["-m", "shared.cli", "check-rules", str(rules)]
    assert (result.build_dir / "event_rules.yaml").read_text() == "rules: []\n"
    env = dict(item.split("=", 1) for item in flag(result.deploy("on-event"), "set-env-vars").split(","))
    assert env["EVENT_RULES"] == "/workspace/event_rules.yaml"
    assert result.gcloud_calls == ""


def test_invalid_rules_file_stops_before_anything(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("not: [valid\n")
    checker = tmp_path / "python-fails"
    checker.write_text("#!/bin/sh\necho 'rules.yaml: bad rule' >&2\nexit 1\n")
    checker.chmod(0o755)
    result = deploy_sh(
        tmp_path,
        "--project=demo-p",
        "--region=europe-west1",
        "--dry-run",
        "--rules-file",
        str(rules),
        env={"PYTHON": str(checker)},
    )
    assert result.returncode != 0
    assert "invalid" in result.stderr
    assert "gcloud" not in "\n".join(line for line in result.stdout.splitlines() if line.startswith("+ "))


def test_missing_project_is_a_usage_error(tmp_path: Path) -> None:
    result = deploy_sh(tmp_path, "--region", "europe-west1", "--dry-run")
    assert result.returncode == 2
    assert "--project is required" in result.stderr
    assert "+ " not in result.stdout
    assert result.gcloud_calls == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--project", "demo-p", "--dry-run"], "--region is required"),
        (["--project", "demo-p", "--region", "europe-west1", "--max-instances", "0"], "--max-instances"),
        (["--project", "demo-p", "--region", "europe-west1", "--fcm-key-file", "/nonexistent/key"], "no such file"),
        (["--project", "demo-p", "--region", "europe-west1", "--bogus"], "unknown argument"),
        (["--project"], "--project needs a value"),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = deploy_sh(tmp_path, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.gcloud_calls == ""


def test_the_package_holds_no_development_only_code(dry_run: Result) -> None:
    """What deploy.sh packages is exactly what runs in the cloud: nothing from local/ (no local bus, no
    fake FCM, no console), and every module of it imports with the package alone, loading nothing from local/."""
    build = dry_run.build_dir
    sources = {p.relative_to(build).as_posix(): p.read_text(encoding="utf-8") for p in sorted(build.rglob("*.py"))}
    assert "main.py" in sources and "shared/bus.py" in sources
    assert [name for name in sources if name.split("/")[0] not in ("main.py", "shared")] == []
    for name, text in sources.items():
        for marker in ("LocalBus", "local_bus", "fake_fcm", "FakeFcm", "console_templates"):
            assert marker not in text, f"{name} holds {marker!r}: development-only code in the cloud build"
    script = "\n".join(
        [
            "import importlib, json, pkgutil, sys",
            "import main, shared",
            "for found in pkgutil.iter_modules(shared.__path__):",
            "    importlib.import_module('shared.' + found.name)",
            "ours = [m.__file__ for n, m in sys.modules.items() if n in ('main', 'shared') or n.startswith('shared.')]",
            "local = sorted(n for n in sys.modules if n == 'local' or n.startswith('local.'))",
            "print(json.dumps({'ours': ours, 'local': local}))",
        ]
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "K_SERVICE", "DELIVER_URL", "ON_EVENT_URL")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=build, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert loaded["local"] == []
    # every module of the package was imported, from the package (not from the repository)
    assert sorted(Path(path).resolve().relative_to(build.resolve()).as_posix() for path in loaded["ours"]) == sorted(
        sources
    )


# --- monitoring (issue 24): log-based metrics, the dashboard, the alert policies, --alert-email ------

MONITORING = ROOT / "infra" / "monitoring"
METRIC_FILES = sorted((MONITORING / "metrics").glob("*.json"))
ALERT_FILES = sorted((MONITORING / "alerts").glob("*.json"))


def _monitoring_dir(result: Result) -> Path:
    return Path(f"{result.build_dir}.monitoring")


def test_dry_run_creates_every_log_based_metric_from_its_file(dry_run: Result) -> None:
    commands = dry_run.commands()
    described = [c[4] for c in commands if c[:4] == ["gcloud", "logging", "metrics", "describe"]]
    created = {
        c[4]: flag(c, "config-from-file") for c in commands if c[:4] == ["gcloud", "logging", "metrics", "create"]
    }
    assert len(METRIC_FILES) >= 10
    assert described == [p.stem for p in METRIC_FILES]  # looked up first: created, or updated
    assert created == {p.stem: str(p) for p in METRIC_FILES}
    for command in commands:
        if command[:3] == ["gcloud", "logging", "metrics"]:
            assert flag(command, "project") == "demo-p"
    enable = next(c for c in commands if c[:3] == ["gcloud", "services", "enable"])
    assert "logging.googleapis.com" in enable and "monitoring.googleapis.com" in enable


def test_dry_run_creates_the_dashboard_and_the_alert_policies(dry_run: Result) -> None:
    commands = dry_run.commands()
    rendered = _monitoring_dir(dry_run)
    [dashboard] = [c for c in commands if c[:4] == ["gcloud", "monitoring", "dashboards", "create"]]
    assert flag(dashboard, "config-from-file") == str(rendered / "dashboard.json")
    board = json.loads((rendered / "dashboard.json").read_text())
    assert board["name"] == "projects/demo-p/dashboards/pushline"
    assert "etag" not in board  # a creation names no version
    policies = [c for c in commands if c[:4] == ["gcloud", "monitoring", "policies", "create"]]
    assert sorted(flag(c, "policy-from-file") for c in policies) == sorted(
        str(rendered / "alerts" / p.name) for p in ALERT_FILES
    )
    lookups = [c for c in commands if c[:4] == ["gcloud", "monitoring", "policies", "list"]]
    titles = {json.loads(p.read_text())["displayName"] for p in ALERT_FILES}
    assert {flag(c, "filter") for c in lookups} == {f'displayName="{t}"' for t in titles}
    for path in [rendered / "dashboard.json", *(rendered / "alerts").glob("*.json")]:
        text = path.read_text()
        assert "@" not in text.replace("@demo-p", ""), f"placeholder left in {path}"
        policy = json.loads(text)
        if "conditions" in policy:
            assert policy["notificationChannels"] == []  # no --alert-email: no channel
    # the subscriptions the deploy looked up (Eventarc names them): placeholders under --dry-run
    oldest = json.loads((rendered / "alerts" / "oldest_unacked.json").read_text())
    assert 'subscription_id="DELIVER_SUBSCRIPTION"' in oldest["conditions"][0]["conditionThreshold"]["filter"]
    assert not [c for c in commands if c[:4] == ["gcloud", "beta", "monitoring", "channels"]]
    # monitoring comes last: the subscriptions it watches exist by then
    position = dry_run.stdout.index
    assert position("gcloud eventarc triggers describe") < position("gcloud monitoring policies create")
    assert dry_run.gcloud_calls == ""


def test_alert_email_finds_or_creates_an_email_channel_used_by_every_policy(tmp_path: Path) -> None:
    result = deploy_sh(
        tmp_path, "--project=demo-p", "--region=europe-west1", "--dry-run", "--alert-email=oncall@example.com"
    )
    assert result.returncode == 0, result.output
    commands = result.commands()
    [lookup] = [c for c in commands if c[:5] == ["gcloud", "beta", "monitoring", "channels", "list"]]
    assert flag(lookup, "filter") == 'type="email" AND labels.email_address="oncall@example.com"'
    [create] = [c for c in commands if c[:5] == ["gcloud", "beta", "monitoring", "channels", "create"]]
    assert flag(create, "type") == "email"
    assert flag(create, "channel-labels") == "email_address=oncall@example.com"
    for path in (_monitoring_dir(result) / "alerts").glob("*.json"):
        assert json.loads(path.read_text())["notificationChannels"] == [
            "projects/demo-p/notificationChannels/ALERT_CHANNEL"
        ]
    assert result.gcloud_calls == ""


def test_alert_email_must_be_an_address(tmp_path: Path) -> None:
    result = deploy_sh(tmp_path, "--project=demo-p", "--region=europe-west1", "--dry-run", "--alert-email=nobody")
    assert result.returncode == 2
    assert "--alert-email" in result.stderr and result.gcloud_calls == ""


def test_a_second_deploy_updates_the_monitoring_in_place(tmp_path: Path) -> None:
    """A real run against a gcloud that has everything already: each metric updated from its file, the
    dashboard updated at the version it has (its etag), each policy updated by the name found for its
    display name, the existing channel reused: nothing created twice."""
    answers = (
        '  "projects describe"*) echo 123456 ;;\n'
        '  "functions describe prune"*) echo https://prune-x.a.run.app ;;\n'
        '  "functions describe deliver"*) echo projects/demo-p/locations/europe-west1/triggers/deliver-1 ;;\n'
        '  "functions describe"*) echo projects/demo-p/locations/europe-west1/triggers/on-event-1 ;;\n'
        '  "eventarc triggers describe"*deliver-1*) echo projects/demo-p/subscriptions/eventarc-deliver-sub ;;\n'
        '  "eventarc triggers describe"*) echo projects/demo-p/subscriptions/eventarc-on-event-sub ;;\n'
        '  "monitoring dashboards describe"*etag*) echo etag-42 ;;\n'
        '  "beta monitoring channels list"*) echo projects/demo-p/notificationChannels/77 ;;\n'
        '  "monitoring policies list"*) echo projects/demo-p/alertPolicies/9 ;;\n'
    )
    migrate = tmp_path / "python-migrate"
    migrate.write_text("#!/bin/sh\nexit 0\n")
    migrate.chmod(0o755)
    result = deploy_sh(
        tmp_path,
        "--project=demo-p",
        "--region=europe-west1",
        "--alert-email=oncall@example.com",
        env={"PYTHON": str(migrate)},
        gcloud_answers=answers,
    )
    assert result.returncode == 0, result.output
    calls = [shlex.split(line) for line in result.gcloud_calls.splitlines()]
    assert not [
        c for c in calls if c[:2] in (["logging", "metrics"], ["monitoring", "dashboards"]) and c[2] == "create"
    ]
    assert not [c for c in calls if c[:3] == ["monitoring", "policies", "create"]]
    assert not [c for c in calls if c[:4] == ["beta", "monitoring", "channels", "create"]]
    assert sorted(c[3] for c in calls if c[:3] == ["logging", "metrics", "update"]) == [p.stem for p in METRIC_FILES]
    updates = [c for c in calls if c[:3] == ["monitoring", "policies", "update"]]
    assert len(updates) == len(ALERT_FILES) and {c[3] for c in updates} == {"projects/demo-p/alertPolicies/9"}
    rendered = _monitoring_dir(result)
    board = json.loads((rendered / "dashboard.json").read_text())
    assert board["etag"] == "etag-42"
    assert [c[3] for c in calls if c[:3] == ["monitoring", "dashboards", "update"]] == [
        "projects/demo-p/dashboards/pushline"
    ]
    oldest = json.loads((rendered / "alerts" / "oldest_unacked.json").read_text())
    assert oldest["notificationChannels"] == ["projects/demo-p/notificationChannels/77"]
    assert 'subscription_id="eventarc-deliver-sub"' in oldest["conditions"][0]["conditionThreshold"]["filter"]
    panels = json.dumps(board)
    assert "eventarc-deliver-sub" in panels and "eventarc-on-event-sub" in panels
