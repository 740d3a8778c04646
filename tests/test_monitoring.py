"""infra/monitoring (issue 24): the log-based metrics, the dashboard and the alert policies deploy.sh applies.

- Their JSON has the shapes gcloud sends to the Logging and Monitoring APIs (``LogMetric``, ``Dashboard``,
  ``AlertPolicy``): required fields, types, enums; the dashboard's tiles fit and never overlap.
- Every metric a dashboard panel or an alert reads is one the deploy creates (a file in
  infra/monitoring/metrics) or a real Cloud Run / Pub/Sub metric; every label they group by exists.
- Every metric's filter matches real log lines: a delivery end to end on the Pub/Sub emulator (delivered,
  dead, failed, payload-rejected and configuration-error tokens, the breaker opening and staying open,
  the safety valve, a 503 of ``send``) writes the functions' JSON log lines, and each filter, read by the
  small evaluator below (the subset of the Logging query language the filters keep to), matches at least
  one of them; the fields its extractors read are there; and the per-part counts sum to the status.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from local.idtoken import emulator_id_token
from local.servers import RedisServer, wait_until
from shared.claims import OUTCOME_COUNTS
from tests.conftest import start_stack

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "infra" / "monitoring"
METRICS = {p.stem: json.loads(p.read_text()) for p in sorted((MONITORING / "metrics").glob("*.json"))}
DASHBOARD = json.loads((MONITORING / "dashboard.json").read_text())
ALERTS = {p.stem: json.loads(p.read_text()) for p in sorted((MONITORING / "alerts").glob("*.json"))}
USER = "logging.googleapis.com/user/"
# Real metrics of the platform the functions run on: (metric type, its metric labels).
PLATFORM = {
    "pubsub.googleapis.com/subscription/num_undelivered_messages": set(),
    "pubsub.googleapis.com/subscription/oldest_unacked_message_age": set(),
    "run.googleapis.com/request_count": {"response_code", "response_code_class", "route"},
    "run.googleapis.com/request_latencies": {"response_code", "response_code_class", "route"},
}
RESOURCE_LABELS = {
    "cloud_run_revision": {"project_id", "service_name", "revision_name", "location", "configuration_name"},
    "pubsub_subscription": {"project_id", "subscription_id"},
}
ALIGNERS = {"ALIGN_NONE", "ALIGN_DELTA", "ALIGN_RATE", "ALIGN_SUM", "ALIGN_MAX", "ALIGN_MIN", "ALIGN_MEAN"}
ALIGNERS |= {"ALIGN_COUNT", *(f"ALIGN_PERCENTILE_{p}" for p in ("99", "95", "50", "05"))}
REDUCERS = {"REDUCE_NONE", "REDUCE_SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_MEAN", "REDUCE_COUNT"}
REDUCERS |= {f"REDUCE_PERCENTILE_{p}" for p in ("99", "95", "50", "05")}
COMPARISONS = {"COMPARISON_GT", "COMPARISON_GE", "COMPARISON_LT", "COMPARISON_LE", "COMPARISON_EQ", "COMPARISON_NE"}
DURATION = re.compile(r"^\d+s$")
# The final outcomes of a token (the status's counts but `retrying`): one metric each.
OUTCOMES = tuple(name for name in OUTCOME_COUNTS if name != "retrying")
# The issue's alerts, each a file: safety valve, breaker open > 5 min, dead letters, oldest job > 10 min, config.
EXPECTED_ALERTS = {"valve_tripped", "breaker_open", "dead_letters", "oldest_unacked", "config_errors"}


# --- a tiny evaluator of the Logging query language subset the metrics' filters use ---------------

TERM = re.compile(r'^(?P<path>[A-Za-z_][\w.]*)\s*(?P<op>>=|=)\s*(?P<value>"[^"]*"|-?\d+(?:\.\d+)?)$')


def parse_filter(text: str) -> list[tuple[str, str, Any]]:
    """``a.b="x" AND c>=5`` -> [(path, op, value)]; anything beyond that subset is an error."""
    terms = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        found = TERM.match(part.strip())
        assert found, f"filter term outside the evaluated subset: {part!r} (in {text!r})"
        raw = found["value"]
        value: Any = raw[1:-1] if raw.startswith('"') else float(raw)
        terms.append((found["path"], found["op"], value))
    return terms


def log_entry(line: dict[str, Any]) -> dict[str, Any]:
    """A JSON line as Cloud Logging stores it for Cloud Run: ``severity`` and ``time`` are taken out,
    the rest (``message`` included) is ``jsonPayload``."""
    payload = {k: v for k, v in line.items() if k not in ("severity", "time")}
    return {"severity": line.get("severity", "DEFAULT"), "jsonPayload": payload}


def field(entry: dict[str, Any], path: str) -> Any:
    value: Any = entry
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def matches(text: str, entry: dict[str, Any]) -> bool:
    for path, op, expected in parse_filter(text):
        value = field(entry, path)
        if isinstance(expected, str):
            if op != "=" or value != expected:
                return False
        elif isinstance(value, bool) or not isinstance(value, int | float):
            return False
        elif not (value == expected if op == "=" else value >= expected):
            return False
    return True


def test_the_evaluator() -> None:
    entry = log_entry({"severity": "INFO", "message": "m", "event": "x", "n": 7, "nested": {"k": "v"}})
    assert matches('jsonPayload.event="x"', entry)
    assert matches('jsonPayload.event="x" AND jsonPayload.n>=7 AND jsonPayload.nested.k="v"', entry)
    assert not matches('jsonPayload.event="x" AND jsonPayload.n>=8', entry)
    assert not matches('jsonPayload.event="y"', entry)
    assert not matches('jsonPayload.missing="x"', entry)
    assert not matches("jsonPayload.event>=1", entry)
    with pytest.raises(AssertionError, match="outside"):
        parse_filter('jsonPayload.event:"x" OR severity>=ERROR')


def extracted(extractor: str) -> str:
    found = re.fullmatch(r"EXTRACT\(([\w.]+)\)", extractor)
    assert found, extractor
    return found[1]


# --- shapes -----------------------------------------------------------------------------------------


def test_the_issue_asks_for_these_metrics_and_alerts() -> None:
    assert {f"pushline_messages_{o}" for o in OUTCOMES} <= set(METRICS)
    assert {"pushline_breaker_opened", "pushline_breaker_open_5min", "pushline_valve_tripped"} <= set(METRICS)
    assert {"pushline_config_errors", "pushline_http_5xx"} <= set(METRICS)
    assert set(ALERTS) == EXPECTED_ALERTS


@pytest.mark.parametrize("name", sorted(METRICS))
def test_log_metric_shape(name: str) -> None:
    """``LogMetric`` (logging v2): name, filter, metricDescriptor; a DISTRIBUTION needs a valueExtractor and
    bucketOptions; every descriptor label has its extractor and the other way round."""
    metric = METRICS[name]
    assert re.fullmatch(r"[A-Za-z0-9_\-.,+!*'()%]{1,100}", name)
    assert set(metric) <= {"description", "filter", "metricDescriptor", "valueExtractor", "labelExtractors",
                           "bucketOptions"}  # fmt: skip
    assert isinstance(metric["description"], str) and metric["description"]
    assert isinstance(metric["filter"], str) and len(metric["filter"]) <= 20000
    parse_filter(metric["filter"])  # within the subset the log-line test evaluates
    descriptor = metric["metricDescriptor"]
    assert descriptor["metricKind"] == "DELTA"
    assert descriptor["valueType"] in ("INT64", "DISTRIBUTION")
    assert isinstance(descriptor.get("unit", "1"), str)
    if descriptor["valueType"] == "DISTRIBUTION":
        assert extracted(metric["valueExtractor"]).startswith("jsonPayload.")
        [(kind, buckets)] = metric["bucketOptions"].items()
        if kind == "exponentialBuckets":
            assert isinstance(buckets["numFiniteBuckets"], int) and buckets["numFiniteBuckets"] > 0
            assert buckets["growthFactor"] > 1 and buckets["scale"] > 0
        else:
            assert kind in ("linearBuckets", "explicitBuckets"), kind
    else:
        assert "valueExtractor" not in metric and "bucketOptions" not in metric
    labels = {label["key"]: label for label in descriptor.get("labels", [])}
    assert set(labels) == set(metric.get("labelExtractors", {}))
    for key, label in labels.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", key)
        assert label["valueType"] in ("STRING", "BOOL", "INT64")
        extracted(metric["labelExtractors"][key])


def _layout_tiles() -> list[dict[str, Any]]:
    layouts = [k for k in ("gridLayout", "mosaicLayout", "rowLayout", "columnLayout") if k in DASHBOARD]
    assert layouts == ["mosaicLayout"]
    return DASHBOARD["mosaicLayout"]["tiles"]


def test_dashboard_shape() -> None:
    """``Dashboard`` (monitoring v1): a displayName, one layout; a mosaic's tiles fit its columns and never
    overlap; each widget one kind; each chart's data sets one query each, filters with valid aggregations."""
    assert set(DASHBOARD) <= {"name", "displayName", "mosaicLayout", "labels"}
    assert DASHBOARD["displayName"] == "pushline"
    assert DASHBOARD["name"] == "projects/@PROJECT@/dashboards/pushline"  # a fixed id: created once, then updated
    columns = DASHBOARD["mosaicLayout"]["columns"]
    assert isinstance(columns, int) and 1 <= columns <= 48
    cells: set[tuple[int, int]] = set()
    for tile in _layout_tiles():
        x, y, w, h = (tile[k] for k in ("xPos", "yPos", "width", "height"))
        assert all(isinstance(v, int) and v >= 0 for v in (x, y, w, h)) and w > 0 and h > 0
        assert x + w <= columns
        mine = {(i, j) for i in range(x, x + w) for j in range(y, y + h)}
        assert not mine & cells, f"tile overlaps another: {tile['widget'].get('title')}"
        cells |= mine
        widget = tile["widget"]
        kinds = [k for k in widget if k != "title"]
        assert len(kinds) == 1 and kinds[0] in ("xyChart", "text", "scorecard"), kinds
        assert isinstance(widget["title"], str) and widget["title"]
        if "text" in widget:
            assert widget["text"]["format"] in ("MARKDOWN", "RAW") and widget["text"]["content"]
            continue
        data_sets = widget["xyChart"]["dataSets"]
        assert data_sets
        for data in data_sets:
            assert data.get("plotType", "LINE") in ("LINE", "STACKED_AREA", "STACKED_BAR", "HEATMAP")
            [(kind, query)] = data["timeSeriesQuery"].items()
            assert kind in ("timeSeriesFilter", "prometheusQuery"), kind
            if kind == "timeSeriesFilter":
                _check_filter_and_aggregation(query["filter"], [query["aggregation"]])
            else:
                assert isinstance(query, str) and query


def _check_filter_and_aggregation(filter_: str, aggregations: list[dict[str, Any]]) -> None:
    assert isinstance(filter_, str) and filter_.count("metric.type=") == 1
    assert 'resource.type="' in filter_
    for aggregation in aggregations:
        assert set(aggregation) <= {"alignmentPeriod", "perSeriesAligner", "crossSeriesReducer", "groupByFields"}
        assert DURATION.match(aggregation["alignmentPeriod"])
        assert aggregation["perSeriesAligner"] in ALIGNERS
        assert aggregation.get("crossSeriesReducer", "REDUCE_NONE") in REDUCERS
        assert all(isinstance(g, str) for g in aggregation.get("groupByFields", []))


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_alert_policy_shape(name: str) -> None:
    """``AlertPolicy`` (monitoring v3): displayName, combiner, 1-6 conditions each of one kind; a threshold
    condition's filter, comparison, thresholdValue, duration and aggregations; documentation in markdown."""
    policy = ALERTS[name]
    assert set(policy) <= {"displayName", "documentation", "combiner", "enabled", "notificationChannels",
                           "conditions", "userLabels", "alertStrategy", "severity"}  # fmt: skip
    assert policy["displayName"].startswith("pushline: ")
    assert policy["combiner"] in ("AND", "OR", "AND_WITH_MATCHING_RESOURCE")
    assert policy["enabled"] is True
    assert policy["notificationChannels"] == ["@ALERT_CHANNEL@"]  # deploy.sh puts --alert-email's channel here
    assert policy["documentation"]["mimeType"] == "text/markdown"
    assert "README" in policy["documentation"]["content"]
    assert 1 <= len(policy["conditions"]) <= 6
    for condition in policy["conditions"]:
        assert isinstance(condition["displayName"], str) and condition["displayName"]
        assert set(condition) == {"displayName", "conditionThreshold"}
        threshold = condition["conditionThreshold"]
        assert threshold["comparison"] in COMPARISONS
        assert isinstance(threshold["thresholdValue"], int | float)
        assert DURATION.match(threshold["duration"])
        assert threshold["trigger"] == {"count": 1}
        _check_filter_and_aggregation(threshold["filter"], threshold["aggregations"])


def test_display_names_are_unique() -> None:
    """deploy.sh finds an alert policy by its display name to update it rather than create a second."""
    names = [p["displayName"] for p in ALERTS.values()]
    assert len(set(names)) == len(names)


# --- what the panels and alerts read ------------------------------------------------------------------


def _filters() -> list[str]:
    found = []
    for tile in _layout_tiles():
        for data in tile["widget"].get("xyChart", {}).get("dataSets", []):
            query = data["timeSeriesQuery"].get("timeSeriesFilter")
            if query:
                found.append((query["filter"], query["aggregation"]))
    for policy in ALERTS.values():
        for condition in policy["conditions"]:
            threshold = condition["conditionThreshold"]
            found += [(threshold["filter"], a) for a in threshold["aggregations"]]
    return found


def _labels_of(metric_type: str) -> set[str]:
    if metric_type.startswith(USER):
        metric = METRICS[metric_type.removeprefix(USER)]
        return {label["key"] for label in metric["metricDescriptor"].get("labels", [])}
    return PLATFORM[metric_type]


def _selected(kind: str, filter_: str) -> str:
    found = re.search(kind + r'\.type="([^"]+)"', filter_)
    assert found, filter_
    return found[1]


def test_every_metric_read_is_created_by_the_deploy_or_the_platforms() -> None:
    read: set[str] = set()
    for filter_, aggregation in _filters():
        metric_type, resource = _selected("metric", filter_), _selected("resource", filter_)
        assert metric_type in PLATFORM or metric_type.removeprefix(USER) in METRICS, metric_type
        read.add(metric_type)
        for label in re.findall(r"metric\.labels\.(\w+)", filter_):
            assert label in _labels_of(metric_type), (metric_type, label)
        for label in re.findall(r"resource\.labels\.(\w+)", filter_):
            assert label in RESOURCE_LABELS[resource], (resource, label)
        for group in aggregation.get("groupByFields", []):
            kind, _, label = group.partition(".label.")
            assert kind in ("metric", "resource"), group
            assert label in (_labels_of(metric_type) if kind == "metric" else RESOURCE_LABELS[resource]), group
    for tile in _layout_tiles():
        for data in tile["widget"].get("xyChart", {}).get("dataSets", []):
            query = data["timeSeriesQuery"].get("prometheusQuery")
            if query:
                # a distribution's sum (PromQL: <metric>_sum), the log-based metric's name PromQL-mapped
                names = re.findall(r"logging_googleapis_com:user_(\w+)_sum\{", query)
                assert names and all(n in METRICS for n in names), query
                assert all(METRICS[n]["metricDescriptor"]["valueType"] == "DISTRIBUTION" for n in names)
                read |= {USER + n for n in names}
    # every message outcome, the breaker, the valve, the config errors and the 5xx are on the dashboard
    assert {USER + name for name in METRICS if name != "pushline_breaker_open_5min"} <= read
    assert set(PLATFORM) <= read


def test_the_pubsub_subscriptions_named_are_the_deployed_ones() -> None:
    deploy = (ROOT / "infra" / "deploy.sh").read_text()
    for filter_, _ in _filters():
        for subscription in re.findall(r'subscription_id="([^"]+)"', filter_):
            if subscription.startswith("@"):  # filled in by deploy.sh from the Eventarc triggers
                assert subscription in ("@JOBS_SUBSCRIPTION@", "@EVENTS_SUBSCRIPTION@")
            else:
                dead = subscription.removesuffix("-sub")
                assert f'"{dead}"' in deploy and '"$dead-sub"' in deploy, subscription


# --- every filter matches what the functions really log ----------------------------------------------

PAUSE = "notif:pause"


@pytest.fixture(scope="module")
def private_redis():
    """A Redis of this module's own: the breaker's pause and the safety valve are project-wide."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def stack(servers, private_redis):
    stack = start_stack(
        redis_url=private_redis.url, database_url=servers.database_url, fcm_delay_ms=5, env={"MAX_ATTEMPTS": "2"}
    )
    yield stack
    stack.stop()


class Logs:
    """The functions' log files, read from where they stood when the test started."""

    def __init__(self, stack) -> None:
        self.paths = dict(stack.logs)
        self.start = {name: path.stat().st_size for name, path in self.paths.items()}

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for name, path in self.paths.items():
            with path.open("rb") as f:
                f.seek(self.start[name])
                for raw in f.read().decode(errors="replace").splitlines():
                    if raw.startswith("{"):
                        try:
                            found.append(json.loads(raw))
                        except ValueError:
                            continue
        return found

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event]


class Api:
    def __init__(self, stack) -> None:
        self.stack = stack
        self.http = requests.Session()

    def register(self, uid: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {emulator_id_token(uid, self.stack.config.project)}"}
        answer = self.http.post(self.stack.url("register") + "/", json={"token": token}, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text

    def send(self, users: list[str]) -> requests.Response:
        body = {"user_ids": users, "notification": {"title": "t", "body": "b"}}
        return self.http.post(self.stack.url("send") + "/", json=body, timeout=30)

    def status(self, nid: str) -> dict:
        answer = self.http.get(f"{self.stack.url('send')}/{nid}", timeout=30)
        return answer.json() if answer.ok else {}

    def done(self, nid: str, timeout: float = 120) -> dict:
        wait_until(lambda: self.status(nid).get("state") == "done", timeout=timeout, interval=0.2, what=nid)
        return self.status(nid)

    def fake(self, path: str, body: dict) -> None:
        assert self.http.post(self.stack.url("fcm") + path, json=body, timeout=30).ok


def part_totals(logs: Logs, nid: str) -> Counter[str]:
    totals: Counter[str] = Counter()
    for line in logs.events("part_processed"):
        if line["notification_id"] == nid:
            for outcome in OUTCOMES:
                totals[outcome] += line[outcome]
    return totals


def outcome_counts(status: dict) -> Counter[str]:
    return Counter({k: status["counts"][k] for k in OUTCOMES if status["counts"].get(k)})


def _mixed_outcomes(api: Api, logs: Logs, run: str) -> None:
    """One token of each kind: the part's line counts each outcome as the status does."""
    user = f"mon-{run}-mixed"
    tokens = {f"ok-{run}", f"dead-{run}", f"payload-{run}", f"flaky-{run}", f"tpa-{run}"}
    for token in tokens:
        api.register(user, token)
    api.fake("/_fake/script", {"token": f"tpa-{run}", "responses": ["THIRD_PARTY_AUTH_ERROR"]})
    nid = api.send([user]).json()["id"]
    status = api.done(nid)
    expected = {"delivered": 1, "dead_removed": 1, "payload_rejected": 1, "failed": 1, "config_error": 1}
    assert outcome_counts(status) == Counter(expected)  # flaky-: 503 twice, MAX_ATTEMPTS=2: failed
    assert +part_totals(logs, nid) == outcome_counts(status)


def _breaker_open_five_minutes(api: Api, logs: Logs, client: redis.Redis, run: str) -> None:
    """FCM fails everything: the breaker opens; the pause is made to look 6 minutes old, so the next failed
    probe says so (outage_ms); then FCM comes back and the probe closes the pause."""
    users = [f"mon-{run}-b{i}" for i in range(30)]
    for user in users:
        for k in range(5):
            api.register(user, f"{user}-t{k}")
    api.fake("/_fake/outage", {"answer": "UNAVAILABLE", "seconds": 3600})
    nid = api.send(users).json()["id"]
    wait_until(lambda: client.exists(PAUSE), timeout=60, interval=0.1, what="the breaker's pause")
    client.hset(PAUSE, "since", int(time.time() * 1000) - 360_000)
    wait_until(
        lambda: any(line["outage_ms"] >= 300_000 for line in logs.events("breaker_probe_failed")),
        timeout=90,
        interval=0.2,
        what="a probe failing after 5 minutes of pause",
    )
    api.fake("/_fake/outage", {"answer": None})
    status = api.done(nid, timeout=180)
    assert status["counts"]["delivered"] == 150
    assert +part_totals(logs, nid) == outcome_counts(status)


def _safety_valve(api: Api, logs: Logs, run: str) -> None:
    """Half of a notification's tokens answered SENDER_ID_MISMATCH: the valve trips; those after it count
    config_error, not dead_removed."""
    users = [f"mon-{run}-v{i}" for i in range(12)]
    for i, user in enumerate(users):
        for k in range(5):
            api.register(user, f"{'mismatch' if i % 2 else 'fine'}-{run}-{i}-{k}")
    nid = api.send(users).json()["id"]
    status = api.done(nid)
    assert status["counts"]["delivered"] == 30
    assert +part_totals(logs, nid) == outcome_counts(status)
    assert logs.events("valve_tripped")


@pytest.mark.e2e
@pytest.mark.slow
def test_every_metric_filter_matches_lines_the_functions_write(stack, private_redis):
    logs, api = Logs(stack), Api(stack)
    client = redis.Redis.from_url(private_redis.url)
    run = uuid.uuid4().hex[:6]
    _mixed_outcomes(api, logs, run)
    _breaker_open_five_minutes(api, logs, client, run)
    _safety_valve(api, logs, run)
    private_redis.kill()  # Redis gone: send answers 503, and says so
    assert api.send([f"mon-{run}-mixed"]).status_code == 503

    entries = [log_entry(line) for line in logs.lines()]
    for name, metric in METRICS.items():
        matched = [e for e in entries if matches(metric["filter"], e)]
        assert matched, f"{name}: its filter matches no line the functions wrote: {metric['filter']}"
        for e in matched:
            if "valueExtractor" in metric:
                value = field(e, extracted(metric["valueExtractor"]))
                assert isinstance(value, int) and not isinstance(value, bool), (name, e)
            for extractor in metric.get("labelExtractors", {}).values():
                path = extracted(extractor)
                if path.startswith("jsonPayload."):  # (resource.labels.* are Cloud Run's)
                    assert field(e, path) not in (None, ""), (name, path, e)


@pytest.fixture
def json_lines():
    """The JSON lines the functions' loggers write (the real formatter), captured in this process."""
    import logging

    from shared import logs

    found: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(self.format(record))

    handler = Keep()
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("pushline")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield found
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_the_other_configuration_errors_are_counted_with_what_is_wrong(env, monkeypatch, tmp_path, json_lines):
    """The configuration errors the end-to-end run does not provoke: FCM refusing deliver's credentials
    (shared/credentials.py) and invalid event rules (shared/domain.py). Their lines match
    pushline_config_errors, each labelled with what is wrong."""
    from shared import credentials, domain
    from tests.test_guarantees import setenv

    credentials.CredentialsAlarm("demo-p").notice(credentials.CredentialsAlarm.REFUSED, "401 UNAUTHENTICATED")
    rules = tmp_path / "rules.json"
    rules.write_text("{not json")
    setenv(monkeypatch, EVENT_RULES=str(rules))
    domain._rules.cache_clear()
    try:
        with pytest.raises(domain.RulesUnavailable):
            domain.rules()
    finally:
        domain._rules.cache_clear()
    metric = METRICS["pushline_config_errors"]
    label = extracted(metric["labelExtractors"]["config"])
    counted = [log_entry(json.loads(line)) for line in json_lines]
    assert {field(e, label) for e in counted if matches(metric["filter"], e)} == {"fcm_credentials", "event_rules"}


def test_a_token_failed_by_the_lease_is_counted_in_the_part_line(fcm, store, monkeypatch, json_lines):
    """The one token the ledger makes final outside a confirmation and outside a window: its sender died
    after its last allowed attempt, so the next copy's lease makes it ``failed``. The part's line counts
    it as the status does (the messages metrics add up to the status's counts)."""
    from shared import delivery, instance
    from shared.claims import ledger_key
    from tests.test_guarantees import event, job, setenv, status

    setenv(monkeypatch, MAX_ATTEMPTS="1")
    store.register("dora", "tok-sent-by-a-dead-copy")
    store.register("dora", "tok-fine")
    # a copy leased it for its one attempt and died: the lease is over, the answer unknown
    instance.claims().register_part("died", 0, ["tok-sent-by-a-dead-copy"], 0, 0)
    instance.redis_client().hset(ledger_key("died"), "tok-sent-by-a-dead-copy", "L:1:0")
    assert delivery.handle(event(job(id="died", user_ids=["dora"]))) == "delivered"
    counts = status("died")["counts"]
    assert (counts["failed"], counts["delivered"]) == (1, 1)
    [line] = [json.loads(line) for line in json_lines if '"part_processed"' in line]
    assert (line["failed"], line["delivered"]) == (1, 1)


def test_tokens_cancelled_by_the_lease_are_counted_in_the_part_line(fcm, store, json_lines):
    """A part of a notification cancelled before it ran: its lease makes every token ``cancelled``, and
    the part's line counts them as the status does."""
    from shared import delivery, instance
    from tests.test_guarantees import event, job, status

    store.register("erin", "tok-e1")
    store.register("erin", "tok-e2")
    instance.claims().create_status("gone", targeted=1, parts_total=1)
    instance.claims().cancel("gone")
    delivery.handle(event(job(id="gone", user_ids=["erin"])))
    assert status("gone")["counts"]["cancelled"] == 2
    [line] = [json.loads(line) for line in json_lines if '"part_processed"' in line]
    assert (line["cancelled"], line["delivered"], line["sent"]) == (2, 0, 0)
    assert fcm.messages() == []


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"MAX_ATTEMPTS": "0", "GOOGLE_CLOUD_PROJECT": "demo-p"}, "MAX_ATTEMPTS"),  # a value out of range
        ({}, "GOOGLE_CLOUD_PROJECT"),  # in the cloud without the project
    ],
)
def test_a_function_that_refuses_to_start_says_so_as_a_configuration_error(env, says):
    """A function whose environment is wrong does not start (functions/main.py raises at import); before
    it does, one CRITICAL JSON line counted by pushline_config_errors (config: environment) names the
    problem, so the alert fires instead of the function silently failing its health check."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "SYSTEMROOT")}
    done = subprocess.run(
        [sys.executable, "-c", "import main"],
        cwd=ROOT / "functions",
        env={**base, "K_SERVICE": "send", "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0 and "ConfigError" in done.stderr
    lines = [json.loads(raw) for raw in done.stderr.splitlines() if raw.startswith("{")]
    metric = METRICS["pushline_config_errors"]
    counted = [line for line in lines if matches(metric["filter"], log_entry(line))]
    assert [line["config"] for line in counted] == ["environment"]
    assert counted[0]["severity"] == "CRITICAL" and says in counted[0]["message"]
