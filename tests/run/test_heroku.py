"""Production on Heroku and PostgreSQL: the Heroku files, several workers, restarts and outages."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from refiner_source import __version__
from refiner_source.config import load_settings
from refiner_source.store import SEGMENT, Store
from tests.conftest import SECRET, entry_for
from tests.e2e.test_e2e import post, tracks, unique_body
from tests.segment_stub import SegmentStub
from tests.service import Service, free_port
from tests.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
# Set by Heroku itself (the runtime, the Postgres add-on), so app.json must not ask for them.
SET_BY_HEROKU = {"PORT", "DATABASE_URL"}


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


# --- the Heroku files ----------------------------------------------------------------------


def test_procfile_has_web_worker_and_release():
    assert procfile() == {
        "web": "bin/refiner-source serve",
        "worker": "bin/refiner-source worker",
        "release": "bin/refiner-source init-db",
    }


def test_app_json_describes_every_variable_the_code_reads():
    class Recording(dict):
        seen: set[str] = set()

        def get(self, key, default=None):
            self.seen.add(key)
            return super().get(key, default)

    env = Recording(SEGMENT_WRITE_KEY="wk", REFINER_WEBHOOK_SECRET="s" * 16)
    load_settings(env)
    app = json.loads((ROOT / "app.json").read_text())
    described = set(app["env"])
    assert env.seen - SET_BY_HEROKU == described, "app.json env and config.py disagree"
    assert all(spec.get("description") for spec in app["env"].values())
    assert app["env"]["REFINER_WEBHOOK_SECRET"]["generator"] == "secret"
    # Either direction can run alone, which a button cannot require: no pair is required, and each
    # variable of a pair says which direction it turns on.
    turns_on = {
        "SEGMENT_WRITE_KEY": "turns on Refiner -> Segment",
        "REFINER_WEBHOOK_SECRET": "turns on Refiner -> Segment",
        "SEGMENT_SHARED_SECRET": "turns on Segment -> Refiner",
        "REFINER_API_KEY": "turns on Segment -> Refiner",
    }
    for name, direction in turns_on.items():
        assert direction in app["env"][name]["description"], name
        assert app["env"][name].get("required") is not True, name
    assert "Leave empty for Segment -> Refiner alone" in app["env"]["SEGMENT_WRITE_KEY"]["description"]
    assert {"plan": "heroku-postgresql", "as": "DATABASE"} in app["addons"]
    assert set(app["formation"]) == set(procfile()) - {"release"}


def test_python_version_is_pinned_the_way_heroku_reads_it():
    version = (ROOT / ".python-version").read_text().strip()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    minimum = cfg["options"]["python_requires"].removeprefix(">=")
    assert tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))
    assert not (ROOT / "runtime.txt").exists()  # deprecated by Heroku in favour of .python-version


def locked(name: str) -> dict[str, tuple[str, list[str]]]:
    """A lock's requirements: name -> (version, hashes), from uv's format (a name==version line with
    its markers, then its `--hash` lines, each ending in a backslash but the last)."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in (ROOT / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            assert current is not None, f"{name}: a hash before any requirement"
            pins[current][1].append(line.removeprefix("--hash=").rstrip(" \\"))
            continue
        requirement = line.split(";")[0].rstrip(" \\")
        assert "==" in requirement, f"{name}: {line!r} is not pinned"
        package, version = requirement.split("==")
        current = canonicalize_name(package)
        pins[current] = (version, [])
    return pins


def declared(extra: str | None = None) -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    text = cfg["options.extras_require"][extra] if extra else cfg["options"]["install_requires"]
    return [Requirement(line) for line in text.splitlines() if line.strip()]


def test_requirements_txt_is_a_lock_every_version_pinned_and_hashed():
    """Heroku installs exactly these files, checked by their hashes; no directory, no host named."""
    for name in ("requirements.txt", "requirements-test.txt"):
        pins = locked(name)
        assert len(pins) > 20, name
        for package, (_version, hashes) in pins.items():
            assert hashes and all(h.startswith("sha256:") and len(h) == 71 for h in hashes), (name, package)
        text = (ROOT / name).read_text()
        assert "://" not in text and "\n.\n" not in text, name


def test_locks_hold_what_setup_cfg_asks_for_at_one_version_each():
    runtime, test = locked("requirements.txt"), locked("requirements-test.txt")
    for requirement in declared():
        version = runtime[canonicalize_name(requirement.name)][0]
        assert requirement.specifier.contains(version), f"requirements.txt: {requirement.name} {version} vs {requirement}"
    for requirement in declared("test"):
        version = test[canonicalize_name(requirement.name)][0]
        assert requirement.specifier.contains(version), f"requirements-test.txt: {requirement.name} {version} vs {requirement}"
    # The tests run what a deploy runs: every package of the deploy's lock, at its version.
    assert {p: v for p, (v, _) in runtime.items()} == {p: test[p][0] for p in runtime}


def test_the_lock_is_written_by_one_uv_release_named_alike_everywhere():
    """A lock remade by another uv may differ in its words alone, which CI's check would fail."""
    (version,) = re.findall(r"^UV_VERSION=(\S+)$", (ROOT / ".ci" / "lock").read_text(), re.M)
    assert f"pip install uv=={version}" in (ROOT / "README.md").read_text()
    assert 'pip install --quiet "uv==$(sed -n \'s/^UV_VERSION=//p\' .ci/lock)"' in (ROOT / ".ci" / "run").read_text()


def test_bin_refiner_source_runs_this_checkout_uninstalled(tmp_path):
    """What the Procfile runs on Heroku, where the lock installs the dependencies but not the package."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHONSAFEPATH": "1"}
    done = subprocess.run(
        [str(ROOT / "bin" / "refiner-source"), "--version"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"refiner-source, version {__version__}"


def test_profile_puts_bin_refiner_source_on_path_for_heroku_run():
    """Heroku sources $HOME/.profile (HOME is the app's root) at each dyno's start, one-off dynos too."""
    env = {"HOME": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["bash", "-c", ". ./.profile && command -v refiner-source"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(ROOT / "bin" / "refiner-source"), done


# --- several processes, one database ---------------------------------------------------------


def _env(store_url: str, segment: SegmentStub, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": store_url,
        "SEGMENT_HOST": segment.url,
        "SEGMENT_WRITE_KEY": "wk",
        "REFINER_WEBHOOK_SECRET": SECRET,
        "WEB_CONCURRENCY": "2",
        **extra,
    }


def test_several_worker_processes_deliver_thousands_of_messages_exactly_once(store_url, segment, tmp_path):
    outbox = Store(store_url)
    outbox.init_schema()
    outbox.store_many([entry_for(r) for r in range(1000)])
    total = 1000 * 3  # messages: each event is an identify, a group and a track
    workers = [Service(["worker"], _env(store_url, segment), tmp_path / f"worker-{i}.log").start() for i in range(3)]
    try:
        received = segment.wait_for(lambda r: len(r) >= total, timeout=120)
        time.sleep(1.0)  # anything sent twice would arrive now
        counts = Counter(m["messageId"] for m in segment.received())
        assert len(counts) == total and set(counts.values()) == {1}, counts.most_common(3)
        # Each worker marks its events after Segment's answer: give the last of them time to, no more.
        deadline = time.monotonic() + 30
        while outbox.stats(SEGMENT).delivered < 1000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert outbox.stats(SEGMENT).delivered == 1000
        assert len({r["headers"].get("User-Agent") for r in segment.requests}) == 1
        assert len(received) == total
    finally:
        for w in workers:
            assert w.stop() == 0, w.logs()[-2000:]
        outbox.dispose()


def test_procfile_under_honcho_delivers_a_burst_exactly_once_and_sigterm_loses_nothing(pg_url, segment, tmp_path):
    """As `heroku local` would: release phase, then a web and two workers on one fresh PostgreSQL."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **_env(pg_url, segment), "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    honcho = [sys.executable, "-m", "honcho"]
    release = subprocess.run(
        [*honcho, "run", *shlex.split(procfile()["release"])], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert release.returncode == 0, release.stderr

    port = free_port()

    def start() -> subprocess.Popen:
        log = open(tmp_path / "honcho.log", "ab")  # noqa: SIM115 - handed to the child
        cmd = [*honcho, "start", "--no-colour", "-p", str(port), "-c", "web=1,worker=2", "web", "worker"]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    web = Service(["serve"], {"PORT": str(port)}, tmp_path / "unused.log")
    acknowledged: list[str] = []

    def burst(offset: int, count: int) -> None:
        for i in range(offset, offset + count):
            try:
                answer = post(web, unique_body(i))
            except requests.RequestException:
                continue  # refused while stopping: Refiner retries those; only acknowledged ones count
            if answer.status_code == 202:
                acknowledged.append(answer.json()["response_id"])

    web.process = start()
    web.wait_ready()
    threads = [threading.Thread(target=burst, args=(k * 1000, 80)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 40:
        if time.monotonic() > deadline or not any(t.is_alive() for t in threads):
            os.killpg(web.process.pid, signal.SIGKILL)
            web.process.wait(30)
            log = (tmp_path / "honcho.log").read_text()[-3000:]
            raise AssertionError(f"only {len(acknowledged)} webhooks acknowledged, the burst over or 60 s gone; honcho's log:\n{log}")
        time.sleep(0.01)
    stopped_at = time.monotonic()
    os.killpg(web.process.pid, signal.SIGTERM)  # a daily dyno restart, in the middle of the burst
    web.process.wait(30)
    assert time.monotonic() - stopped_at < 25
    for t in threads:
        t.join()

    web.process = start()
    try:
        web.wait_ready()
        received = segment.wait_for(lambda r: tracks(r) >= set(acknowledged), timeout=90)
        time.sleep(1.0)  # anything sent twice would arrive now
        counts = Counter(m["messageId"] for m in segment.received())
        assert tracks(received) >= set(acknowledged)
        assert set(counts.values()) == {1}, "a message was sent twice"
        log = (tmp_path / "honcho.log").read_text()
        assert "worker.1" in log and "worker.2" in log and "web.1" in log
    finally:
        os.killpg(web.process.pid, signal.SIGTERM)
        web.process.wait(30)


def test_database_connections_cut_during_traffic_give_503_then_recover_without_restart(pg_url, segment, tmp_path):
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    service = Service(["serve"], {**_env(proxied, segment), "PORT": str(free_port())}, tmp_path / "serve.log").start()
    try:
        before = [post(service, unique_body(i)) for i in range(10)]
        assert {r.status_code for r in before} == {202}

        proxy.cut()
        during = [post(service, unique_body(100 + i)) for i in range(5)]
        assert {r.status_code for r in during} == {503}
        assert all(r.json()["error"] == "store_unavailable" for r in during)
        assert requests.get(service.url + "/readyz", timeout=10).status_code == 503
        assert requests.get(service.url + "/healthz", timeout=10).status_code == 200

        proxy.restore()
        deadline = time.monotonic() + 30
        while requests.get(service.url + "/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "did not recover"
            time.sleep(0.2)
        # Refiner's retries of the 503s. /readyz answered from one web process; each of the two may
        # still hold, for up to a second, the group commit's connection that the cut killed: its
        # next write fails once (503, retried by the sender), then it takes a pinged one.
        after, refused = [], 0
        for i in range(5):
            while (answer := post(service, unique_body(100 + i))).status_code == 503:
                refused += 1
                assert refused <= 2, "a web process answered 503 twice after the database came back"
            after.append(answer)
        assert {r.status_code for r in after} == {202}

        expected = {r.json()["response_id"] for r in before + after}
        segment.wait_for(lambda r: tracks(r) >= expected, timeout=60)
        assert service.process.poll() is None
    finally:
        service.stop()
        proxy.close()
