"""deploy/modeld.service under a real systemd (PID 1 of a container), installed the way
its header says: the venv at /opt/modeld (copied from the built image), the config at
/etc/modeld/modeld.toml, models at /var/lib/modeld/models (a read-only bind mount here),
and no static ``modeld`` user, so that DynamicUser allocates one."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.container.conftest import (
    GEMMA,
    REPO,
    Measurements,
    ndjson,
    poll,
    skip_unless_enabled,
)
from tests.deploy.podman import Container, Podman, unique_name

skip_unless_enabled()
pytestmark = pytest.mark.timeout(2400)

UNIT = "modeld.service"
CONTAINERFILE = """\
ARG BASE
ARG APP
FROM ${APP} AS app
FROM ${BASE}
RUN apt-get update \\
    && apt-get install -y --no-install-recommends systemd systemd-sysv libgomp1 python3 \\
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=app /opt/modeld /opt/modeld
COPY modeld.service /etc/systemd/system/modeld.service
COPY modeld.toml modeld.env /etc/modeld/
RUN mkdir -p /var/lib/modeld/models && systemctl enable modeld.service
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
"""
# The documented override file: listen beyond loopback (podman publishes the container's
# address), serve Gemma by default and load it before answering ready.
MODELD_ENV = f"""\
MODELD_HOST=0.0.0.0
MODELD_DEFAULT_MODEL={GEMMA}
MODELD_PREWARM_DEFAULT=1
MODELD_THREADS=2
MODELD_N_CTX=1024
"""
LONG_STORY = {"prompt": "Tell a long story.", "max_tokens": 900, "temperature": 0.7, "seed": 7}


@pytest.fixture(scope="module")
def systemd_image(
    podman: Podman,
    base_image: str,
    modeld_image: str,
    tmp_path_factory: pytest.TempPathFactory,
    measurements: Measurements,
) -> str:
    context = tmp_path_factory.mktemp("systemd-image")
    (context / "Containerfile").write_text(CONTAINERFILE)
    (context / "modeld.env").write_text(MODELD_ENV)
    for name in ("modeld.service", "modeld.toml"):
        shutil.copyfile(REPO / "deploy" / name, context / name)
    tag = f"localhost/{unique_name('modeld-test')}:systemd"
    built = podman.build(
        context,
        tag,
        build_args={"BASE": base_image, "APP": modeld_image},
        log_path=context / "build.log",
    )
    measurements["systemd image build"] = f"{built.elapsed_s:.0f} s"
    return tag


class Systemd:
    def __init__(self, container: Container, base_url: str) -> None:
        self.container = container
        self.base_url = base_url

    def systemctl(self, *args: str) -> str:
        return self.container.exec("systemctl", *args).stdout.strip()

    def show(self, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", UNIT, *(f"--property={name}" for name in properties))
        return dict(line.split("=", 1) for line in out.splitlines())

    def wait_ready(self) -> None:
        with self.container.diagnostics():
            poll(lambda: httpx.get(f"{self.base_url}/readyz"), lambda r: r.status_code == 200)

    def ensure_running(self) -> None:
        if self.show("ActiveState")["ActiveState"] != "active":
            self.systemctl("start", UNIT)
        self.wait_ready()

    def journal(self) -> str:
        return self.container.exec("journalctl", "--unit", UNIT, "--no-pager").stdout


@pytest.fixture(scope="module")
def systemd(podman: Podman, systemd_image: str, gemma_models_dir: Path) -> Iterator[Systemd]:
    container = podman.start(
        systemd_image,
        options=[
            "--systemd=always", "--cap-add", "SYS_ADMIN", "-p", "127.0.0.1::8080",
            "-v", f"{gemma_models_dir}:/var/lib/modeld/models:ro",
        ],
    )  # fmt: skip
    unit = Systemd(container, f"http://127.0.0.1:{container.host_port()}")
    poll(lambda: container.exec("systemctl", "is-system-running", check=False).stdout,
         lambda state: state.strip() in {"running", "degraded"})  # fmt: skip
    unit.wait_ready()
    yield unit
    podman("stop", "--time", "30", container.name, check=False)


def test_unit_verifies(systemd: Systemd) -> None:
    verified = systemd.container.exec(
        "systemd-analyze", "verify", f"/etc/systemd/system/{UNIT}", check=False
    )
    assert verified.returncode == 0, verified.stderr
    assert UNIT not in verified.stderr, verified.stderr


def test_starts_sandboxed_and_answers(systemd: Systemd) -> None:
    systemd.ensure_running()
    state = systemd.show("ActiveState", "SubState", "MainPID", "UnitFileState")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert state["UnitFileState"] == "enabled"
    status = systemd.container.exec("cat", f"/proc/{state['MainPID']}/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    uid = int(fields["Uid"].split()[0])
    assert 61184 <= uid <= 65519  # systemd's range for dynamic users
    assert int(fields["CapEff"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # SystemCallArchitectures= installs a filter
    with httpx.Client(base_url=systemd.base_url, timeout=60) as client:
        body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
        result = client.post("/infer", json={**body, "stream": False}).json()
    assert "France" in result["text"]
    assert '"message":"modeld serving","host":"0.0.0.0"' in systemd.journal()


def test_restarts_after_kill_9(systemd: Systemd) -> None:
    systemd.ensure_running()
    before = systemd.show("MainPID", "NRestarts")
    systemd.container.exec("sh", "-c", f"kill -9 {before['MainPID']}")
    after = poll(
        lambda: systemd.show("ActiveState", "MainPID", "NRestarts", "Result"),
        lambda s: s["ActiveState"] == "active" and s["MainPID"] not in ("0", before["MainPID"]),
        timeout_s=30,
    )
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    systemd.wait_ready()
    assert (
        f"{UNIT}: Main process exited, code=killed, status=9/KILL"
        in systemd.container.exec("journalctl", "--no-pager").stdout
    )


def test_systemctl_stop_drains_and_exits_cleanly(systemd: Systemd) -> None:
    systemd.ensure_running()
    stopped: dict[str, float] = {}

    def stop() -> None:
        started = time.monotonic()
        systemd.systemctl("stop", UNIT)
        stopped["elapsed_s"] = time.monotonic() - started

    with (
        httpx.Client(base_url=systemd.base_url, timeout=60) as client,
        client.stream("POST", "/infer", json=LONG_STORY) as response,
    ):
        lines = response.iter_lines()
        assert "text" in json.loads(next(lines))
        stopper = threading.Thread(target=stop)
        stopper.start()
        rest = ndjson(list(lines))
        stopper.join(timeout=60)
    assert rest[-1]["done_reason"] == "shutdown"
    state = systemd.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert state == {
        "ActiveState": "inactive",  # not "failed", and not restarted
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED: it exited by itself, no SIGKILL
        "ExecMainStatus": "0",
    }
    # modeld.toml's shutdown_grace (10 s) bounds the drain; TimeoutStopSec (30 s) is not hit.
    assert stopped["elapsed_s"] < 15
    assert "modeld stopped" in systemd.journal()
