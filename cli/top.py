"""`logitcast top`: a live terminal view of a teacher fleet and its trainers.

Per poll it shows fleet tokens/s; tokens/s, queued tokens and in-flight requests
per teacher replica; tokens/s and stall ratio (share of step time spent waiting
for targets) per trainer rank; and the trainers' cache hit ratio. The numbers
come either straight from /metrics endpoints (`--targets`: rates are counter
deltas between two polls) or from a Prometheus server (`--prometheus`: the
recording rules of deploy/rules/logitcast.rules.yml, see docs/monitoring.md).

It knows metric and rule names only. It does not discover targets (pass them,
or let Prometheus find them), keeps no history beyond the previous poll, and
in `--targets` mode names a replica or rank by the host:port it scraped, since
the `replica`/`rank` labels are added by Prometheus, not by the processes.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

TEACHER_TOKENS = "logitcast_teacher_tokens_total"
QUEUE_TOKENS = "logitcast_teacher_queue_tokens"
INFLIGHT = "logitcast_teacher_inflight_requests"
TRAINER_TOKENS = "logitcast_trainer_tokens_total"
STEP_SECONDS = "logitcast_trainer_step_seconds_total"
WAIT_SECONDS = "logitcast_client_wait_seconds_total"
CACHE_HITS = "logitcast_client_cache_hits_total"
CACHE_MISSES = "logitcast_client_cache_misses_total"

#: what the view needs -> PromQL over deploy/rules/logitcast.rules.yml
QUERIES = {
    "replica_tps": "logitcast:replica_tokens_per_second:rate1m",
    "fleet_tps": "logitcast:fleet_tokens_per_second:rate1m",
    "queue": f"sum by (replica) ({QUEUE_TOKENS})",
    "inflight": f"sum by (replica) ({INFLIGHT})",
    "trainer_tps": "logitcast:trainer_tokens_per_second:rate1m",
    "stall": "logitcast:trainer_stall_ratio:rate1m",
    "cache_hit": "logitcast:client_cache_hit_ratio:rate1m",
    "down": 'up{job=~"logitcast-.*"} == 0',
}

#: one instant-vector query result: (labels, value) per series
Series = list[tuple[dict[str, str], float]]


class TopError(Exception):
    """A target or Prometheus that cannot be read; the message is one line."""


@dataclass(frozen=True)
class Scrape:
    """One /metrics poll: sample name -> value summed over labels; `time` in seconds."""

    time: float
    values: dict[str, float]


@dataclass(frozen=True)
class ReplicaRow:
    replica: str
    tokens_per_second: float | None
    queue_tokens: float | None
    inflight: float | None


@dataclass(frozen=True)
class TrainerRow:
    rank: str
    tokens_per_second: float | None
    stall_ratio: float | None


@dataclass(frozen=True)
class FleetView:
    """What one poll shows; None where a figure is not known (yet)."""

    fleet_tokens_per_second: float | None
    replicas: list[ReplicaRow]
    trainers: list[TrainerRow]
    cache_hit_ratio: float | None
    down: list[str]


# ---------------------------------------------------------------- pure: scrapes -> view

def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {sample name: value summed over its label sets}."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def counter_delta(prev: Scrape, cur: Scrape, name: str) -> float | None:
    """Increase of counter `name` between two scrapes (a drop means a restart)."""
    if name not in prev.values or name not in cur.values:
        return None
    delta = cur.values[name] - prev.values[name]
    return cur.values[name] if delta < 0 else delta


def counter_rate(prev: Scrape, cur: Scrape, name: str) -> float | None:
    """Per-second increase of counter `name` between two scrapes."""
    delta = counter_delta(prev, cur, name)
    seconds = cur.time - prev.time
    return None if delta is None or seconds <= 0 else delta / seconds


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def view_from_scrapes(prev: dict[str, Scrape], cur: dict[str, Scrape | None]) -> FleetView:
    """Rows from this poll's scrapes (None: unreachable) and the previous good ones."""
    replicas, trainers, down = [], [], []
    hits = misses = 0.0
    for name, now in cur.items():
        if now is None:
            down.append(name)
            continue
        before = prev.get(name)
        if TEACHER_TOKENS in now.values:
            replicas.append(ReplicaRow(
                name, counter_rate(before, now, TEACHER_TOKENS) if before else None,
                now.values.get(QUEUE_TOKENS), now.values.get(INFLIGHT)))
        if TRAINER_TOKENS in now.values:
            stall = (_ratio(counter_delta(before, now, WAIT_SECONDS),
                            counter_delta(before, now, STEP_SECONDS)) if before else None)
            trainers.append(TrainerRow(
                name, counter_rate(before, now, TRAINER_TOKENS) if before else None, stall))
        if before is not None:
            hits += counter_delta(before, now, CACHE_HITS) or 0.0
            misses += counter_delta(before, now, CACHE_MISSES) or 0.0
    rates = [r.tokens_per_second for r in replicas if r.tokens_per_second is not None]
    return FleetView(sum(rates) if rates else None, replicas, trainers,
                     _ratio(hits, hits + misses), down)


# ---------------------------------------------------------------- pure: queries -> view

def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) or math.isinf(value) else value


def _by(series: Series, label: str) -> dict[str, float | None]:
    return {labels.get(label, ""): _finite(value) for labels, value in series}


def view_from_queries(results: dict[str, Series]) -> FleetView:
    """Rows from the results of QUERIES (same keys) against Prometheus."""
    tps, queue, inflight = (_by(results[k], "replica") for k in ("replica_tps", "queue", "inflight"))
    replicas = [ReplicaRow(r, tps.get(r), queue.get(r), inflight.get(r))
                for r in sorted(set(tps) | set(queue) | set(inflight))]
    trainer_tps, stall = _by(results["trainer_tps"], "rank"), _by(results["stall"], "rank")
    trainers = [TrainerRow(r, trainer_tps.get(r), stall.get(r))
                for r in sorted(set(trainer_tps) | set(stall), key=lambda r: (len(r), r))]
    fleet = [_finite(v) for _, v in results["fleet_tps"]]
    hit = [_finite(v) for _, v in results["cache_hit"]]
    down = [f"{labels.get('job', '?')} {labels.get('instance', '?')}"
            for labels, _ in results["down"]]
    return FleetView(fleet[0] if fleet else None, replicas, trainers, hit[0] if hit else None,
                     down)


# ---------------------------------------------------------------- pure: view -> text

def _num(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _pct(value: float | None) -> str:
    return _num(None if value is None else 100 * value, "{:.1f}%")


def format_view(view: FleetView) -> str:
    """The table `top` prints for one poll."""
    lines = [f"fleet {_num(view.fleet_tokens_per_second)} tok/s    "
             f"cache hit ratio {_pct(view.cache_hit_ratio)}", ""]
    width = max([len(r.replica) for r in view.replicas] + [len(t.rank) for t in view.trainers]
                + [len("replica")])
    if view.replicas:
        lines.append(f"{'replica':<{width}}  {'tok/s':>12}  {'queue tok':>10}  {'in-flight':>9}")
        lines += [f"{r.replica:<{width}}  {_num(r.tokens_per_second):>12}  "
                  f"{_num(r.queue_tokens, '{:,.0f}'):>10}  {_num(r.inflight, '{:,.0f}'):>9}"
                  for r in view.replicas]
        lines.append("")
    if view.trainers:
        lines.append(f"{'rank':<{width}}  {'tok/s':>12}  {'stall':>10}")
        lines += [f"{t.rank:<{width}}  {_num(t.tokens_per_second):>12}  {_pct(t.stall_ratio):>10}"
                  for t in view.trainers]
        lines.append("")
    if not view.replicas and not view.trainers:
        lines += ["no logitcast teacher or trainer metrics found", ""]
    if view.down:
        lines.append("down: " + ", ".join(view.down))
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- edges: HTTP

_READ_ERRORS = (OSError, ValueError, http.client.HTTPException)


def _get(url: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        raise TopError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise TopError(f"cannot reach {url}: {exc.reason}") from None
    except _READ_ERRORS as exc:
        raise TopError(f"cannot reach {url}: {exc}") from None


def http_url(target: str, default_path: str = "") -> str:
    """`host:port` or an http(s) URL -> URL, with `default_path` when it has no path."""
    url = target if "://" in target else f"http://{target}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TopError(f"not an http(s) address: {target!r}")
    if parts.path in ("", "/") and default_path:
        parts = parts._replace(path=default_path)
    return urllib.parse.urlunsplit(parts)


def scrape(url: str, timeout: float) -> Scrape:
    text = _get(url, timeout)
    try:
        return Scrape(time.monotonic(), parse_metrics(text))
    except ValueError as exc:
        raise TopError(f"{url} is not Prometheus text format: {exc}") from None


def query(base: str, expr: str, timeout: float) -> Series:
    """One instant query against Prometheus' HTTP API."""
    url = f"{base.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        body = json.loads(_get(url, timeout))
        if body.get("status") != "success":
            raise TopError(f"{base}: query {expr!r} failed: {body.get('error', body)}")
        return [(item["metric"], float(item["value"][1])) for item in body["data"]["result"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TopError(f"{base} did not answer like Prometheus: {exc!r}") from None


class TargetPoller:
    """Scrapes /metrics endpoints; a first scrape at start is the base of the first rates."""

    warmup = True

    def __init__(self, targets: list[str], timeout: float) -> None:
        self.urls = {urllib.parse.urlsplit(u).netloc: u
                     for u in (http_url(t, "/metrics") for t in targets)}
        self.timeout = timeout
        self.prev = {name: scrape(url, timeout) for name, url in self.urls.items()}
        self.source = f"{len(self.urls)} /metrics target(s)"

    def poll(self) -> FleetView:
        cur: dict[str, Scrape | None] = {}
        for name, url in self.urls.items():
            try:
                cur[name] = scrape(url, self.timeout)
            except TopError:
                cur[name] = None
        view = view_from_scrapes(self.prev, cur)
        self.prev.update({name: s for name, s in cur.items() if s is not None})
        return view


class PrometheusPoller:
    """Queries the recording rules on a Prometheus server."""

    warmup = False

    def __init__(self, base: str, timeout: float) -> None:
        self.base, self.timeout = http_url(base).rstrip("/"), timeout
        self.source = self.base

    def poll(self) -> FleetView:
        return view_from_queries({k: query(self.base, q, self.timeout) for k, q in QUERIES.items()})


# ---------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--targets", nargs="+", metavar="URL",
                        help="/metrics endpoints of teachers and trainers (http://h:p/metrics "
                             "or h:p); rates from counter deltas between polls")
    source.add_argument("--prometheus", metavar="URL",
                        help="a Prometheus server with deploy/rules/logitcast.rules.yml loaded")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    p.add_argument("--iterations", type=int, default=0, help="polls to show; 0: until Ctrl-C")
    p.add_argument("--timeout", type=float, default=5.0, help="HTTP timeout per request, seconds")


def run(args: argparse.Namespace) -> int:
    if args.interval < 0 or args.iterations < 0 or args.timeout <= 0:
        raise SystemExit(f"logitcast top: --interval and --iterations must be >= 0 and --timeout "
                         f"> 0, got {args.interval}, {args.iterations}, {args.timeout}")
    clear = sys.stdout.isatty()
    try:
        poller = (TargetPoller(args.targets, args.timeout) if args.targets
                  else PrometheusPoller(args.prometheus, args.timeout))
        polls = range(args.iterations) if args.iterations else itertools.count()
        for i in polls:
            if i or poller.warmup:
                time.sleep(args.interval)
            block = (f"logitcast top  {time.strftime('%H:%M:%S')}  {poller.source}\n\n"
                     + format_view(poller.poll()))
            sys.stdout.write(("\x1b[H\x1b[2J" + block) if clear else block + "\n")
            sys.stdout.flush()
    except TopError as exc:
        raise SystemExit(f"logitcast top: {exc}") from None
    except KeyboardInterrupt:
        pass
    return 0
