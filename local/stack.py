"""The whole system on one machine: what ``./emulator.sh`` runs, and what end-to-end tests start.

Real Redis and PostgreSQL (the ones listening, or servers from pip wheels), the schema, the
Pub/Sub emulator with the jobs topic pushed to ``deliver`` as Eventarc would (or the local bus
where gcloud is absent), the fake FCM with a realistic answer delay, and each function under
functions-framework. Every process it starts is recorded in ``.run/stack.json`` and stopped by
``stop`` (or Ctrl-C), including after a crash; nothing else is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local.pubsub_emulator import PubSubEmulator
from local.servers import Servers, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"
STATE_FILE = RUN_DIR / "stack.json"
BIN = Path(sys.executable).parent
JOBS_TOPIC = "pushline-jobs"
EVENTS_TOPIC = "pushline-events"

FUNCTIONS = ("register", "send", "deliver", "on_event", "tick")
TICK_EVERY_SECONDS = float(os.environ.get("TICK_EVERY_SECONDS", 5))  # ./emulator.sh: Cloud Scheduler's stand-in


@dataclass
class StackConfig:
    project: str = "demo-pushline"
    ports: dict[str, int] = field(
        default_factory=lambda: {
            "register": int(os.environ.get("REGISTER_PORT", 8081)),
            "send": int(os.environ.get("SEND_PORT", 8082)),
            "deliver": int(os.environ.get("DELIVER_PORT", 8083)),
            "on_event": int(os.environ.get("ON_EVENT_PORT", 8084)),
            "tick": int(os.environ.get("TICK_PORT", 8086)),
            "fcm": int(os.environ.get("FCM_PORT", 9090)),
            "pubsub": int(os.environ.get("PUBSUB_PORT", 8085)),
            "console": int(os.environ.get("CONSOLE_PORT", 8090)),
        }
    )
    fcm_delay_ms: float = float(os.environ.get("FCM_DELAY_MS", 40))
    use_emulator: bool | None = None  # None: when gcloud is installed
    database: str = "pushline"
    redis_db: int | None = None  # None: as REDIS_URL says
    redis_url: str | None = None  # a Redis to use as it is (e.g. a private one a fault test stops)
    database_url: str | None = None  # a PostgreSQL database to use as it is
    functions: tuple[str, ...] = FUNCTIONS
    console: bool = True
    # Seconds between calls of tick (what Cloud Scheduler does every minute in the cloud); 0: never
    # (tests call tick themselves).
    tick_every: float = 0
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the functions
    state_file: Path | None = STATE_FILE
    quiet: bool = False

    @classmethod
    def free_ports(cls, **kwargs: Any) -> StackConfig:
        """A configuration on free ports (tests run beside anything else)."""
        names = ("register", "send", "deliver", "on_event", "tick", "fcm", "pubsub", "console")
        return cls(ports={n: free_port() for n in names}, **kwargs)


class Stack:
    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self.servers: Servers | None = None
        self.emulator: PubSubEmulator | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.env: dict[str, str] = {}
        self._ticker_stop = threading.Event()

    # --- urls ------------------------------------------------------------------------------------

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.config.ports[name]}"

    @property
    def using_emulator(self) -> bool:
        return self.emulator is not None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        RUN_DIR.mkdir(exist_ok=True)
        if cfg.state_file is not None:
            stop_recorded(cfg.state_file)
        self.servers = Servers(
            database=cfg.database, redis_db=cfg.redis_db, redis_url=cfg.redis_url, database_url=cfg.database_url
        ).start()
        self._say(f"Redis       {self.servers.redis_url} ({self.servers.redis_source})")
        self._say(f"PostgreSQL  {_hide_password(self.servers.database_url)} ({self.servers.database_source})")
        self._migrate()
        use_emulator = cfg.use_emulator if cfg.use_emulator is not None else shutil.which("gcloud") is not None
        self.env = self._function_env(use_emulator)
        self._spawn(
            "fcm",
            [
                str(BIN / "python"),
                "-m",
                "local.fake_fcm",
                "--port",
                str(cfg.ports["fcm"]),
                "--delay-ms",
                str(cfg.fcm_delay_ms),
            ],
        )
        if use_emulator:
            self.emulator = PubSubEmulator(project=cfg.project, port=cfg.ports["pubsub"]).start()
            self._say(f"Pub/Sub     emulator on {self.emulator.host}")
        else:
            self._say("Pub/Sub     gcloud not found: using the in-process local bus (DELIVER_URL)")
        for name in cfg.functions:
            self._spawn(name, self._function_command(name), env=self.env)
        if use_emulator:
            self._wire_emulator()
        if cfg.console and (ROOT / "local" / "console.py").exists():
            self._spawn(
                "console",
                [str(BIN / "python"), "-m", "local.console", "--port", str(cfg.ports["console"])],
                env={
                    **self.env,
                    "CONSOLE_REGISTER_URL": self.url("register"),
                    "CONSOLE_SEND_URL": self.url("send"),
                    "CONSOLE_FCM_URL": self.url("fcm"),
                },
            )
        self._record()
        for name in self.processes:
            self._wait_ready(name)
        if cfg.tick_every > 0 and "tick" in self.processes:
            threading.Thread(target=self._tick_forever, name="ticker", daemon=True).start()
            self._say(f"tick        called every {cfg.tick_every:g} s (Cloud Scheduler: every minute)")

    def _tick_forever(self) -> None:
        """Call tick every ``tick_every`` seconds until the stack stops (Cloud Scheduler's stand-in)."""
        while not self._ticker_stop.wait(self.config.tick_every):
            with contextlib.suppress(OSError, urllib.error.URLError):
                request = urllib.request.Request(self.url("tick") + "/", data=b"", method="POST")
                urllib.request.urlopen(request, timeout=60).close()

    def _migrate(self) -> None:
        from shared.db import Database, migrate

        assert self.servers is not None
        database = Database(self.servers.database_url)
        migrate(database)
        database.close()

    def _function_env(self, use_emulator: bool) -> dict[str, str]:
        cfg = self.config
        assert self.servers is not None
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHONUNBUFFERED": "1",
            "REDIS_URL": self.servers.redis_url,
            "DATABASE_URL": self.servers.database_url,
            "GOOGLE_CLOUD_PROJECT": cfg.project,
            "FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099",
            "FCM_ENDPOINT": self.url("fcm"),
            "PUBSUB_TOPIC": JOBS_TOPIC,
            "EVENTS_TOPIC": EVENTS_TOPIC,
            "CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{cfg.ports['console']},http://localhost:{cfg.ports['console']}",
        }
        if use_emulator:
            env["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{cfg.ports['pubsub']}"
            env["PUBSUB_PROJECT_ID"] = cfg.project
        else:
            env["DELIVER_URL"] = self.url("deliver")
            env["ON_EVENT_URL"] = self.url("on_event")
        env.update(cfg.env)
        return env

    def _function_command(self, name: str) -> list[str]:
        return [
            str(BIN / "functions-framework"),
            "--source",
            str(ROOT / "functions" / "main.py"),
            "--target",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.config.ports[name]),
        ]

    def _wire_emulator(self) -> None:
        assert self.emulator is not None
        em = self.emulator
        em.create_topic(JOBS_TOPIC)
        em.create_push_subscription(
            "pushline-deliver", JOBS_TOPIC, self.url("deliver") + "/", ack_deadline=600, min_backoff=1, max_backoff=10
        )
        if "on_event" in self.config.functions:
            em.create_topic(EVENTS_TOPIC)
            em.create_push_subscription(
                "pushline-on-event",
                EVENTS_TOPIC,
                self.url("on_event") + "/",
                ack_deadline=600,
                min_backoff=1,
                max_backoff=10,
            )

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        RUN_DIR.mkdir(exist_ok=True)
        log_path = RUN_DIR / f"{name}-{self.config.ports.get(name, 0)}.log"
        log = open(log_path, "ab")
        full_env = {**os.environ, **(env or {})} if env is None else {**env}
        full_env.setdefault("PYTHONPATH", str(ROOT))
        self.processes[name] = subprocess.Popen(
            command,
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.logs[name] = log_path

    def _wait_ready(self, name: str) -> None:
        port = self.config.ports[name]
        process = self.processes[name]

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited; see {self.logs[name]}:\n{self.logs[name].read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            except urllib.error.HTTPError:
                return True  # it answered
            except (urllib.error.URLError, OSError):
                return False
            return True

        wait_until(answers, timeout=60, interval=0.1, what=f"{name} on port {port}")

    def kill(self, name: str) -> None:
        """SIGKILL one part (and its process group), as a crash would."""
        process = self.processes[name]
        _signal_group(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def restart(self, name: str) -> None:
        """Start a killed function again on the same port, with the same environment."""
        self._spawn(name, self._function_command(name), env=self.env)
        self._wait_ready(name)
        self._record()

    def _record(self) -> None:
        if self.config.state_file is None:
            return
        groups = [p.pid for p in self.processes.values()]
        if self.emulator is not None and self.emulator._process is not None:
            groups.append(self.emulator._process.pid)
        state = {
            "groups": groups,
            "servers": self.servers.cleanup_info() if self.servers else {},
            "ports": self.config.ports,
            "project": self.config.project,
            "env": self.env,
        }
        self.config.state_file.write_text(json.dumps(state))

    def stop(self) -> None:
        self._ticker_stop.set()
        for process in self.processes.values():
            _signal_group(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            _signal_group(process.pid, signal.SIGKILL)  # anything the leader left behind in its group
        self.processes.clear()
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None
        if self.servers is not None:
            self.servers.stop()
            self.servers = None
        if self.config.state_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.config.state_file.unlink()

    def _say(self, line: str) -> None:
        if not self.config.quiet:
            print(line, flush=True)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _kill_group(pid: int) -> None:
    """Stop a process group this process did not start (recorded by an earlier run)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def stop_recorded(state_file: Path = STATE_FILE) -> bool:
    """Stop what an earlier run recorded (it may have crashed); True if there was anything."""
    if not state_file.exists():
        return False
    try:
        state = json.loads(state_file.read_text())
    except ValueError:
        state = {}
    for pid in state.get("groups", []):
        _kill_group(int(pid))
    Servers.cleanup_recorded(state.get("servers", {}))
    with contextlib.suppress(FileNotFoundError):
        state_file.unlink()
    return True


def _hide_password(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.split("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


def walkthrough(stack: Stack) -> str:
    project = stack.config.project
    reg, snd = stack.url("register"), stack.url("send")
    pusher = "the Pub/Sub emulator" if stack.using_emulator else "the local bus"
    cli = "shared.cli" if stack.using_emulator else "local.cli"  # local.cli: the CLI with the local bus plugged in
    wanted = ("GOOGLE_CLOUD_PROJECT", "PUBSUB_EMULATOR_HOST", "DELIVER_URL", "ON_EVENT_URL", "REDIS_URL")
    event_env = " ".join(f"{k}={stack.env[k]}" for k in wanted if k in stack.env)
    lines = [
        "",
        "pushline is running locally:",
        f"  register   {reg}/",
        f"  send       {snd}/            (GET {snd}/<id> for a notification's status)",
        f"  deliver    {stack.url('deliver')}/   (pushed by {pusher})",
        f"  on_event   {stack.url('on_event')}/",
        f"  tick       {stack.url('tick')}/   (POST: publishes the scheduled sends that are due; "
        f"called every {stack.config.tick_every:g} s here)",
        f"  fake FCM   {stack.url('fcm')}/_fake/messages",
    ]
    if "console" in stack.processes:
        lines.append(f"  console    {stack.url('console')}/")
    lines += [
        "",
        "Walkthrough (copy and paste into another terminal):",
        f"  TOKEN=$(.venv/bin/python -m local.idtoken alice --project {project})",
        f"  curl -s -X POST {reg}/ -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\",
        '       -d \'{"token": "phone-of-alice", "platform": "android"}\'',
        f"  ID=$(curl -s -X POST {snd}/ -H 'Content-Type: application/json' \\",
        '       -d \'{"user_ids": ["alice"], "notification": {"title": "Hello", "body": "from pushline"}}\' \\',
        "       | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)[\"id\"])')",
        f"  curl -s {snd}/$ID",
        f"  curl -s '{stack.url('fcm')}/_fake/messages?token=phone-of-alice'",
        "",
        "A domain event turned into a notification by infra/rules.example.json (order.completed):",
        f"  {event_env} .venv/bin/python -m {cli} publish-event order.completed \\",
        '       \'{"user_id": "alice", "order_id": "A-17"}\'',
        f"  curl -s '{stack.url('fcm')}/_fake/messages?token=phone-of-alice'   # now also 'Order A-17 completed'",
        "",
        "  ./emulator.sh demo     runs this with a healthy and a dead device, and checks the outcome",
        "Ctrl-C (or ./emulator.sh stop) stops everything this started.",
    ]
    return "\n".join(lines)


def _http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def demo(stack: Stack) -> bool:
    """Two devices, one dead: one delivered, one dead token removed from both stores."""
    from local.idtoken import emulator_id_token

    user = f"demo-{int(time.time())}"
    healthy, dead = f"healthy-{user}", f"dead-{user}"
    auth = {"Authorization": f"Bearer {emulator_id_token(user, stack.config.project)}"}
    for token, platform in ((healthy, "android"), (dead, "ios")):
        status, body = _http("POST", stack.url("register") + "/", {"token": token, "platform": platform}, auth)
        print(f"register {token[:14]}…  -> {status} {body}")
        if status != 200:
            return False
    status, body = _http(
        "POST",
        stack.url("send") + "/",
        {"user_ids": [user], "notification": {"title": "Hello", "body": "from the demo"}},
    )
    print(f"send -> {status} {body}")
    if status != 202:
        return False
    nid = body["id"]
    final: Any = None

    def done() -> bool:
        nonlocal final
        code, final = _http("GET", f"{stack.url('send')}/{nid}")
        return code == 200 and final["state"] == "done"

    try:
        wait_until(done, timeout=60, interval=0.2, what="the notification to be done")
    except TimeoutError:
        print(f"status never reached done: {final}")
        return False
    print(f"status -> {json.dumps(final)}")
    counts = final["counts"]
    _, fake = _http("GET", f"{stack.url('fcm')}/_fake/messages?token={healthy}")
    received = fake["messages"]
    from shared import config, instance

    os.environ["REDIS_URL"], os.environ["DATABASE_URL"] = stack.env["REDIS_URL"], stack.env["DATABASE_URL"]
    config.settings.cache_clear()
    instance.reset()
    store = instance.token_store()
    left = set(store.tokens(user)) | set(store.db_tokens(user))
    ok = counts["delivered"] == 1 and counts["dead_removed"] == 1 and left == {healthy} and len(received) >= 1
    print(
        f"outcome: delivered={counts['delivered']} dead_removed={counts['dead_removed']} "
        f"devices left={sorted(left)} -> {'OK' if ok else 'FAILED'}"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emulator.sh")
    parser.add_argument("command", choices=["run", "stop", "demo"], nargs="?", default="run")
    args = parser.parse_args(argv)
    if args.command == "stop":
        print("stopped" if stop_recorded() else "nothing was running")
        return 0
    if args.command == "demo" and _running():
        return 0 if demo(_attach()) else 1
    stack = Stack(StackConfig(tick_every=TICK_EVERY_SECONDS))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        stack.start()
        if args.command == "demo":
            return 0 if demo(stack) else 1
        print(walkthrough(stack), flush=True)
        while all(p.poll() is None for p in stack.processes.values()):
            time.sleep(0.5)
        dead = [n for n, p in stack.processes.items() if p.poll() is not None]
        print(f"stopped: {', '.join(dead)} exited (see .run/*.log)")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
        print("everything this started is stopped", flush=True)


def _running() -> bool:
    if not STATE_FILE.exists():
        return False
    state = json.loads(STATE_FILE.read_text())
    alive = 0
    for pid in state.get("groups", []):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(pid), 0)
            alive += 1
    return alive > 0 and "env" in state


def _attach() -> Stack:
    state = json.loads(STATE_FILE.read_text())
    stack = Stack(StackConfig(ports=state["ports"], project=state["project"]))
    stack.env = state["env"]
    return stack


if __name__ == "__main__":
    sys.exit(main())
