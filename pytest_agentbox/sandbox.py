"""The hardened sandbox: container lifecycle, the ordered setup, and the ``Sandbox`` API.

Usable without pytest::

    from pytest_agentbox import SandboxConfig, Sandbox
    with Sandbox.create(SandboxConfig(image="agentbox/base:bookworm")) as sb:
        print(sb.run("id -u").stdout)

Setup order (any failure removes everything made so far): container (non-root user for
all user code, no-new-privileges, capabilities dropped, limits, allowlisted env, owner
labels; the home and /tmp are size-capped tmpfs volumes) -> start -> hardening as root
(ending with / read-only) -> agent code and persisted state -> the root
forwarder to the sidecar's sockets -> ``setup_command`` as the user. When traffic may
leave or keys are in use, the sidecar (egress proxy and key proxy, in a container of
its own) starts in a thread meanwhile; the forwarder waits for it.

Once any user code has run, nothing runs as root in the agent's container again: logs
come from the sidecar through the engine's archive API, snapshots through the same API,
and uploads are unpacked by the agent user itself. Every user process starts through
``runner.py``, which first installs ``userfilter.py``'s seccomp filter.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import shlex
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pytest_agentbox import paths
from pytest_agentbox.backends import tools
from pytest_agentbox.backends.base import (
    DEFAULT_IMAGE,
    MAX_OUTPUT,
    Backend,
    Box,
    BoxSpec,
    Channel,
    ExecConfig,
    ExecOutput,
    ExecStream,
    Sidecar,
    Volume,
    backend_for,
    start_daemon,
)
from pytest_agentbox.errors import AgentboxError, HardeningError, KeyProxyError, SetupCommandFailed
from pytest_agentbox.inside import hardening
from pytest_agentbox.policy.manifest import KeyRoute, Resources, format_size
from pytest_agentbox.policy.values import MAX_SECONDS, check_image_ref

DEFAULT_TIMEOUT = 300.0
# Below this pids limit gVisor's own threads starve: measured on Debian's runsc 2022-12,
# 96 fails closed (no subreaper) in 1.3 s, 64 hangs the first exec for the client's 120 s.
GVISOR_PIDS_MIN = 96

# Host memory a sandbox's output may hold. The history (for failure reports) keeps the
# tail of each stream of its last HISTORY_LENGTH commands within HISTORY_BYTES in all;
# a spawned process's unread stdout lines stop its reader (and so, through the socket,
# the process's writes) at SPAWN_BUFFER; one line keeps its first SPAWN_LINE bytes and
# stderr its last SPAWN_STDERR. Whatever is not kept is counted.
HISTORY_LENGTH = 20
HISTORY_BYTES = 4 * 1024 * 1024
SPAWN_BUFFER = 16 * 1024 * 1024
SPAWN_LINE = 16 * 1024 * 1024
SPAWN_STDERR = 1024 * 1024

# Exactly these host variables reach the sandbox (seed: allowlist, not denylist). They
# shape output and locale only; none can carry code, credentials or a proxy/CA change.
FORWARDED_ENV = (
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TERM",
    "COLORTERM",
    "NO_COLOR",
    "FORCE_COLOR",
)

# The root steps need these and nothing else: SYS_ADMIN for the hidepid and read-only
# remounts, CHOWN/FOWNER to create the user's home, fill it from the image and strip
# setuid bits from files root does not own, KILL for the main process to end the
# agent's processes when a failing sandbox is kept. User processes never hold them:
# non-root + no-new-privileges clears them.
HARDENING_CAPS = ("SYS_ADMIN", "CHOWN", "FOWNER", "KILL")

# The host's own clock on every user exec: the runner enforces a command's limit, but
# the agent can stop the runner (kill -STOP $PPID). Past the limit plus this grace (the
# runner's own kill of a fork bomb may take 10 s) the host stops waiting and says so.
RUNNER_GRACE = 15.0
# The overall budget of a teardown read that execs as the user (storage use, memory
# events): a frozen sandbox delays a failure report by seconds, not minutes.
TEARDOWN_BUDGET = 5.0
# The longest command time limit taken (7 days), the options' own bound: a socket
# timeout or interval timer cannot hold 1e12 s.
MAX_TIMEOUT = MAX_SECONDS


def check_cap_add(caps: Any) -> tuple[str, ...]:
    """``caps`` as a tuple if every one is among :data:`HARDENING_CAPS`, else AgentboxError.

    Only root's setup steps hold these (user processes never do), but the engine widens
    its seccomp profile for each added capability, and the user filter takes back only
    what the hardening set opens: nothing else may be added.
    """
    if isinstance(caps, str) or not isinstance(caps, Sequence):
        raise AgentboxError(
            f"cap_add {caps!r} is not a list of capability names; allowed: a subset of "
            f"{list(HARDENING_CAPS)}"
        )
    names = tuple(str(c).upper().removeprefix("CAP_") for c in caps)
    extra = sorted({n for n in names if n not in HARDENING_CAPS})
    if extra or any(not isinstance(c, str) for c in caps):
        raise AgentboxError(
            f"cap_add {list(caps)!r} is refused: only the hardening set "
            f"{list(HARDENING_CAPS)} (or a subset) may be added. Root's setup steps need "
            "exactly these, user code never holds any, and each extra one widens the "
            "engine's seccomp profile beyond what the sandbox's own filter takes back."
        )
    return names


def check_timeout(value: Any, what: str = "timeout") -> float:
    """``value`` as seconds if it is a finite number in (0, MAX_TIMEOUT], else ValueError."""
    import math

    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} {value!r} is not a number of seconds")
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise ValueError(
            f"{what} {value!r} is out of range: a number of seconds greater than 0 and at "
            f"most {MAX_TIMEOUT:g} (7 days)"
        )
    return float(value)


_PATH = ":".join(tools.SYSTEM_DIRS)

# The container's main process: it reads its stdin (the owner's attach socket) until
# end-of-file, so the container stops as soon as the owning process is gone. Only the
# owner can send it "keep" (the agent has no way to its stdin): then it ends every other
# process, as a restart would, and stays up without stdin, so the in-memory home and
# /tmp survive for the person who steps in. Absolute paths, no PATH lookup.
_MAIN = [
    "/bin/sh",
    "-c",
    'while read -r line; do if [ "$line" = keep ]; then kill -9 -1; '
    "for s in /bin/sleep /usr/bin/sleep; do [ -x $s ] && exec $s 2147483647; done; fi; done",
]
_KEEP = b"keep\n"

# The largest image home copied into each sandbox's home volume (through the root
# step's stdin); a larger one is refused with what to do about it.
MAX_HOME_SEED = 32 * 1024 * 1024


def _runner_source() -> str:
    """The user-command runner, behind the seccomp filter it installs first."""
    return (tools.tool_source("userfilter.py") + b"\n" + tools.tool_source("runner.py")).decode()


def _root_step_failure(cmd: list[str], out: ExecOutput) -> str:
    """What went wrong in a root setup step that gave no result line, and what to do."""
    err = out.stderr.decode(errors="replace").strip()
    said = err[-700:] or "nothing on stderr; stdout ended with: " + (
        out.stdout.decode(errors="replace").strip()[-300:] or "(nothing)"
    )
    step = next((a for a in cmd if a.endswith(".py")), cmd[0])
    head = f"sandbox root setup step {step} failed (exit {out.exit_code}): {said}"
    if "agentbox: no python3 in the image" in err:
        return f"{head}. The image needs python3 in one of {', '.join(tools.SYSTEM_DIRS)}."
    if "OCI runtime exec failed" in err or (out.exit_code in (126, 127) and not out.stdout):
        return f"{head}. The engine could not start {cmd[0]}: the image needs it (a POSIX shell)."
    if out.exit_code == 0:
        return f"{head}. It ended without its JSON result line (is the image's python3 patched?)."
    return f"{head}. That is the step's own error, as root in the image before any user code."


# Sandboxes of this process that are not yet removed: swept at session end and exit,
# so Ctrl-C or an error between steps never leaves a container running.
_LIVE: dict[str, Sandbox] = {}
_LIVE_LOCK = threading.Lock()

# Image id -> the setuid/setgid files its first sandbox in this process found; later
# sandboxes of the same (immutable) image strip and verify that list without a rescan.
_SETID_SCANS: dict[str, list[str]] = {}

# (image id, home) -> the image's home as a tar (base64, "" when it has none): read once
# per process from a never-started container, then copied into every sandbox's home.
_HOME_SEEDS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class CommandResult:
    """The outcome of :meth:`Sandbox.run`."""

    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False
    stdout_dropped: int = 0  # bytes printed past the output cap (counted, not kept)
    stderr_dropped: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class SandboxConfig:
    """Everything a sandbox is made from; the plugin builds it from manifest and markers."""

    image: str = DEFAULT_IMAGE
    # The sidecar holds the real keys: it runs from an image we built (debootstrap, see
    # `agentbox image build`), not from the sandbox's, whose code, loader configuration
    # (/etc/ld.so.preload), libc, libssl and python would otherwise run beside the keys.
    sidecar_image: str = DEFAULT_IMAGE
    code_dir: Path | None = None
    setup_command: str | None = None
    resources: Resources = field(default_factory=Resources)
    user: str = "agent"
    uid: int = 1000
    cap_add: tuple[str, ...] = HARDENING_CAPS
    key_routes: tuple[KeyRoute, ...] = ()
    # Provider -> real key. Never printed: repr=False, and only the key proxy's stdin sees it.
    keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    egress: Any = None  # egress.EgressPolicy, or None for no network at all
    egress_network: str = "bridge"
    # The engine's OCI runtime for the agent's container (e.g. "runsc"); None: the
    # engine's default. Set from --agentbox-runtime, runtime= or the manifest's
    # isolation. The sidecar stays on the default (see sidecar.start).
    runtime: str | None = None
    # Exact host name -> address the sidecar connects to without DNS (the test fakes).
    egress_pins: Mapping[str, str] = field(default_factory=dict)
    extra_ca_pem: str | None = None
    state_scope: str | None = None
    state_store: Any = None  # state.StateStore
    state_limits: Any = None  # state.Limits
    timeout: float = DEFAULT_TIMEOUT
    setup_timeout: float = 900.0
    run_id: str = field(default_factory=paths.token)
    host_env: Mapping[str, str] | None = None  # defaults to os.environ
    progress: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check (and normalise) the fields a user can set wrong; ValueError if one is."""
        self.cap_add = check_cap_add(self.cap_add)
        check_image_ref(self.image)
        check_image_ref(self.sidecar_image)
        self.timeout = check_timeout(self.timeout)
        self.setup_timeout = check_timeout(self.setup_timeout, "setup_timeout")

    def box_spec(self, labels: Mapping[str, str] | None = None) -> BoxSpec:
        """What the sandbox's box is: image, user, limits, network mode, runtime, labels,
        main command and capabilities, without what a test adds (keys, routes, tokens,
        state, env overrides). ``labels``: the owner's (default: this process's)."""
        res = self.resources
        unrestricted = self.egress is not None and self.egress.unrestricted
        home = f"/home/{self.user}"
        return BoxSpec(
            image=self.image,
            command=tuple(_MAIN),
            user="0",  # the main process; user code never runs as it (runner.py)
            agent_user=self.user,
            agent_uid=self.uid,
            hostname="agentbox",
            env=self.create_env(),
            labels=dict(labels if labels is not None else self.owner().labels("sandbox")),
            role="sandbox",
            memory_bytes=res.memory_bytes,
            cpus=res.cpus,
            pids=res.pids,
            disk_bytes=res.disk_bytes,
            writable=((home, 0o700), ("/tmp", 0o1777)),
            # The agent itself joins it only when unrestricted: never the host's namespace.
            network=self.egress_network if unrestricted else None,
            runtime=self.runtime,
            cap_add=tuple(self.cap_add),
        )

    def owner(self) -> paths.Owner:
        """The labels' owner: this process, in this config's run."""
        return paths.Owner.current(self.run_id)

    def create_env(self) -> dict[str, str]:
        """The box's create-time environment: the allowlisted host variables and PATH."""
        import os

        host = os.environ if self.host_env is None else self.host_env
        env = {k: host[k] for k in FORWARDED_ENV if k in host}
        env["PATH"] = _PATH
        return env


@dataclass
class Step:
    name: str
    seconds: float


class Sandbox:
    """A running, hardened sandbox. Create it with :meth:`Sandbox.create`.

    Everything it does to its box goes through ``backend``
    (:class:`~pytest_agentbox.backends.base.Backend`) and the box it made
    (:class:`~pytest_agentbox.backends.base.Box`).
    """

    def __init__(self, config: SandboxConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self.box: Box | None = None
        self.sidecar: Sidecar | None = None
        self.volume: Volume | None = None  # shared with the sidecar (its sockets)
        self.storage_volumes: list[Volume] = []  # the home's and /tmp's capped volumes
        self._channel: Channel | None = None  # the owner's hold on the main process
        self._python = ""  # the image's python3, absolute, checked root-owned by hardening
        self._runner_python = ""  # its execute-only copy, which user commands start from
        self._user_code_ran = False
        # A user exec passed its deadline: the agent may be stopping our processes. The
        # engine then holds the container's exec list for the stuck start, and an
        # inspect would wait on it and hold up removal: teardown reads skip.
        self._unanswered = False
        self.hardening: dict[str, Any] = {}
        self.user: dict[str, Any] = {"name": config.user, "uid": config.uid, "gid": config.uid}
        self.home = f"/home/{config.user}"
        self.workdir = f"{self.home}/app"
        self.steps: list[Step] = []
        self.warnings: list[str] = []
        # Copies whose streams keep their tails (HISTORY_BYTES in all); run() returns whole.
        self.history: deque[CommandResult] = deque(maxlen=HISTORY_LENGTH)
        self.proxy_ports: dict[str, int] = {}
        # How the agent's 127.0.0.1 ports reach the sidecar: "handed over" (it accepts on
        # them itself, no process of ours stays here) or "relayed (why)"; "" without one.
        self.forwarding = ""
        self.state_report: str = ""
        self.logs: dict[str, str] = {}
        self._env: dict[str, str] = {}
        self._tools_dir = f"/run/agentbox-{paths.token()}"
        self._egress_dir = f"/run/agentbox-egress-{paths.token()}"
        self._token = secrets.token_hex(16)  # the agent's 128-bit session token
        self._ca_bundle = f"{self._tools_dir}-ca.pem"
        self._closed = False
        self._runtime = config.runtime  # with the engine's default filled in on create
        self.setup_seconds = 0.0

    # ---- creation --------------------------------------------------------------

    @classmethod
    def create(
        cls,
        config: SandboxConfig,
        backend: Backend | None = None,
        *,
        on_created: Callable[[Sandbox], None] | None = None,
    ) -> Sandbox:
        """Create, harden and set up a sandbox; on any failure nothing is left behind.

        ``backend``: where the box runs (default: :func:`~pytest_agentbox.backends.base.
        backend_for` the environment's engine). ``on_created`` receives the sandbox before
        any step runs, so a caller's teardown can find it (and its report sections) even
        when setup fails.
        """
        # Again here: a field assigned after construction never went through the checks.
        config.validate()
        if backend is None:
            backend = backend_for(None)
        elif not isinstance(backend, Backend):
            raise TypeError(
                f"Sandbox.create: {type(backend).__name__} is not a backend; wrap a docker "
                "client in pytest_agentbox.backends.docker.box.DockerBackend.from_client()"
            )
        sb = cls(config, backend)
        if on_created is not None:
            on_created(sb)
        start = time.monotonic()
        try:
            sb._setup()
        except BaseException:
            sb.collect_logs()  # for the failed setup's report: the sandbox goes next
            sb.close()
            raise
        finally:
            sb.setup_seconds = time.monotonic() - start
        return sb

    @contextlib.contextmanager
    def _step(self, name: str):  # type: ignore[no-untyped-def]
        start = time.monotonic()
        try:
            yield
        finally:
            self.steps.append(Step(name, time.monotonic() - start))

    def _routes(self) -> list[dict[str, Any]]:
        """The key proxy's routes, real keys included (for the sidecar's stdin only)."""
        cfg = self.config
        return [
            {"name": r.provider, "domain": r.domain, "auth_style": r.auth_style,
             "key": cfg.keys[r.provider]}
            for r in cfg.key_routes
            if r.provider in cfg.keys
        ]  # fmt: skip

    def _agent_allow(self) -> list[str]:
        """Hosts the agent itself may reach through the egress proxy (not the key domains:
        the agent talks to a provider only through the key proxy)."""
        policy = self.config.egress
        if policy is None or policy.unrestricted:
            return []
        return list(policy.agent_allowlist())

    def _setup(self) -> None:
        cfg = self.config
        self.backend.ensure_image(cfg.image)
        owner = cfg.owner()
        routes, agent_allow = self._routes(), self._agent_allow()
        if routes or agent_allow:
            self.backend.ensure_image(
                cfg.sidecar_image, what="sidecar image", option="sidecar-image"
            )
            self.volume = self.backend.create_volume(
                paths.unique_name("egress"), owner.labels("egress")
            )
        # The sidecar needs nothing from the sandbox but the volume: its engine work
        # overlaps the sandbox's own. Leaving the block waits for it, whatever happened,
        # so close() always sees it.
        with ThreadPoolExecutor(max_workers=1) as pool:
            sidecar_started = (
                pool.submit(self._start_sidecar, owner, agent_allow, routes)
                if self.volume is not None
                else None
            )
            with self._step("create container"):
                self._create_container(owner)
            seed = self._home_seed(owner)
            with self._step("harden"):
                report = self._harden(seed)
            if cfg.code_dir is not None or not report.get("app"):
                with self._step("upload code"):
                    self._upload_code()
            if cfg.state_scope and cfg.state_store is not None:
                with self._step("restore state"):
                    self._restore_state()
        if sidecar_started is not None:
            sidecar_started.result()  # its error, if it had one
        self._env = self._base_env()
        if cfg.extra_ca_pem:
            self._use_ca_bundle()
        if self.sidecar is not None:
            with self._step("forwarder"):
                self._start_forwarder(bool(agent_allow), routes)
        if cfg.setup_command:
            with self._step("setup_command"):
                self._run_setup_command(cfg.setup_command)

    @property
    def _storage_home(self) -> str:
        return f"/home/{self.config.user}"

    def _home_seed(self, owner: paths.Owner) -> str:
        """The image's own home as a tar for hardening to copy into the home volume.

        Read through the engine from a container that never starts (the sandbox's own
        would show the empty volume), once per image and process.
        """
        key = (self._box.image_id, self._storage_home)
        if key not in _HOME_SEEDS:
            _HOME_SEEDS[key] = self._read_home_seed(owner, key)
        seed = _HOME_SEEDS[key]
        # The tar (its headers too) a little over what the files need: a fair test of fit.
        if len(seed) // 4 * 3 > self.config.resources.disk_bytes:
            raise AgentboxError(self._too_big(f"its {key[1]}"))
        return seed

    def _read_home_seed(self, owner: paths.Owner, key: tuple[str, str]) -> str:
        with self._step("read image home"):
            data = self.backend.read_image_tar(
                key[0], key[1], limit=MAX_HOME_SEED + 1, labels=owner.labels("seed")
            )
        if len(data) > MAX_HOME_SEED:
            raise AgentboxError(
                f"image {self.config.image!r}: its {key[1]} holds more than "
                f"{MAX_HOME_SEED // 2**20} MiB, which would be copied into every sandbox's "
                "in-memory home. Install large things outside the home (e.g. /opt or "
                "/usr/local) in the image."
            )
        return base64.b64encode(data).decode()

    def _harden(self, seed: str) -> dict[str, Any]:
        image_id = self._box.image_id
        ours = {self._egress_dir, self._storage_home, "/tmp"}
        # Image VOLUMEs are file systems of their own, filled from the image: scanned too.
        # Not the home and /tmp: nosuid, and filled only by the root step, setid bits off.
        volumes = [m for m in self._box.volume_mounts if m not in ours]
        opts = {
            "user": self.config.user,
            "uid": self.config.uid,
            "tools_dir": self._tools_dir,
            # Written by root into the 0700 directory: no archive upload (each costs the
            # engine a process start), and the agent can neither read nor replace it.
            "tools": {"egressproxy.py": tools.tool_source("egressproxy.py").decode()}
            if self.volume is not None
            else {},
            "app": "app" if self.config.code_dir is None else None,
            "setid": _SETID_SCANS.get(image_id),
            "volumes": volumes,
            "ca": {"path": self._ca_bundle, "pem": self.config.extra_ca_pem}
            if self.config.extra_ca_pem
            else None,
            "storage": {
                "mode": "tmpfs volumes, read-only root",
                "home": self._storage_home,
                "tmp": "/tmp",
                "cap": format_size(self.config.resources.disk_bytes),
                "quota": self._storage_quota(),
                "seed": seed,
            },
        }
        argv, source = tools.tool_command("hardening.py")
        report = self._root_json(argv, stdin=source + json.dumps(opts).encode() + b"\n")
        self.hardening = report
        info = self.backend.info()
        self.warnings += hardening.check(
            report,
            keys_in_use=bool(self.config.key_routes),
            image=self.config.image,
            gvisor=self._runtime in info.gvisor_runtimes,
            root_in_memory=self._runtime in info.memory_root_runtimes,
        )
        self.user = report["user"]
        self.home = self.user["home"]
        self.workdir = f"{self.home}/app"
        self._python = str(report["python"])
        self._runner_python = str(report["runner_python"])
        if image_id and "found" in report:
            _SETID_SCANS.setdefault(image_id, list(report["found"]))
        return report

    def _create_container(self, owner: paths.Owner) -> None:
        cfg = self.config
        spec = cfg.box_spec(owner.labels("sandbox"))
        mounts: dict[str, Volume] = {}
        if self.volume is not None:
            mounts[self._egress_dir] = self.volume
        # The only places the agent can write once hardening made / read-only: RAM,
        # capped, gone with the container (so the snapshot is taken while it runs).
        for where, mode in spec.writable:
            vol = self.backend.create_volume(
                paths.unique_name("storage"), owner.labels("storage"),
                size=spec.disk_bytes, mode=mode,
            )  # fmt: skip
            self.storage_volumes.append(vol)
            mounts[where] = vol
        self._check_memory()
        self._check_runtime()
        if spec.network is not None:  # the agent itself joins it: never the host's namespace
            self.backend.check_network(spec.network)
        self.box = self._create(spec, mounts)
        self._register()
        self._channel = self.box.attach()
        self.box.start()

    @property
    def _box(self) -> Box:
        """The box, once created (every step after creation uses it)."""
        if self.box is None:
            raise AgentboxError("the sandbox has no box yet (or no longer)")
        return self.box

    def _create(self, spec: BoxSpec, mounts: Mapping[str, Volume]) -> Box:
        """``backend.create_box``, its out-of-space error said in terms of the cap.

        The engine copies the image's files at each volume's path into the new volume
        at create time (the copy is then hidden by the tmpfs): an image home or /tmp
        larger than the cap fails that copy.
        """
        try:
            return self.backend.create_box(spec, mounts=mounts)
        except Exception as exc:
            if "no space left on device" not in str(exc).lower():
                raise
            raise AgentboxError(self._too_big(f"its {self._storage_home} or /tmp")) from None

    def _too_big(self, what: str) -> str:
        cap = format_size(self.config.resources.disk_bytes)
        return (
            f"image {self.config.image!r}: {what} holds more than the sandbox's {cap} disk "
            "cap, so it does not fit into the sandbox's in-memory home. Raise "
            "resources.disk (and memory with it: the home is held in memory), or install "
            "large things outside the home (e.g. /opt or /usr/local) in the image."
        )

    def _check_memory(self) -> None:
        """Refuse a memory limit above the engine's whole memory (clear, before create)."""
        want = self.config.resources.memory_bytes
        try:
            total = self.backend.info().memory_total
        except Exception:  # no figure: the engine enforces what it can
            total = 0
        if total and want > total:
            raise AgentboxError(
                f"resources.memory {self.config.resources.memory!r} is more than the Docker "
                f"engine's whole memory ({format_size(total)}): the limit could never be "
                "reached, and the sandbox's in-memory home and /tmp could take the host's "
                f"memory. Lower resources.memory to at most {format_size(total)} (and disk "
                "with it)."
            )

    def _check_runtime(self) -> None:
        """Refuse a runtime the engine does not have, instead of running under its default,
        and a pids limit gVisor cannot even start a process under."""
        info, want, pids = self.backend.info(), self.config.runtime, self.config.resources.pids
        self._runtime = want or info.default_runtime  # what the engine will use
        have = sorted(info.runtimes)
        if want and want not in have:
            raise AgentboxError(
                f"runtime {want!r} is not registered with this Docker engine (it has: "
                f"{', '.join(have) or 'none listed'}). Register it in the engine's daemon.json "
                "(`runtimes`, then reload dockerd), or choose another with --agentbox-runtime "
                "/ the manifest's runtime.isolation; for gVisor see scripts/engine2."
            )
        if self._runtime in info.gvisor_runtimes and (pids or 1 << 30) < GVISOR_PIDS_MIN:
            raise HardeningError(  # else the engine's first exec hangs for 120 s
                f"sandbox hardening failed closed: a pids limit of {pids} is below "
                f"{GVISOR_PIDS_MIN}, which gVisor (runsc) needs for its own threads (with "
                "64 the engine's exec hangs). Raise resources.pids or run under runc."
            )

    def _storage_quota(self) -> str:
        """The engine's word on capping a box's own writable layer, for the report."""
        try:
            return self.backend.info().storage_quota
        except Exception as exc:  # only a description: never the reason a sandbox fails
            return f"unknown ({type(exc).__name__})"

    def _register(self) -> None:
        with _LIVE_LOCK:
            _LIVE[self._box.id] = self

    # ---- environment -----------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = self.config.create_env()
        env.update(
            HOME=self.home,
            USER=self.user["name"],
            LOGNAME=self.user["name"],
            SHELL="/bin/sh",
        )
        return env

    @property
    def env(self) -> dict[str, str]:
        """The agent's environment (a copy): what every :meth:`run` starts with."""
        return dict(self._env)

    @property
    def container_id(self) -> str:
        """The box's id on its backend (a container id on Docker)."""
        return self._box.id

    @property
    def user_spec(self) -> str:
        return f"{self.user['uid']}:{self.user['gid']}"

    # ---- root steps --------------------------------------------------------------

    def _refuse_root_after_user_code(self) -> None:
        # Root never acts on what the agent could have touched: once user code has run,
        # everything in this container could be the agent's (binaries, files, pids).
        if self._user_code_ran:
            raise AgentboxError("refusing to run as root in the sandbox after user code ran")

    def _root_env(self) -> dict[str, str | None]:
        """Every loader variable of the image's ENV unset (None) for a root exec: the
        loader would act on LD_PRELOAD and friends before the step's own code."""
        from pytest_agentbox.inside.runner import is_loader_variable

        names = (v.split("=", 1)[0] for v in self._container_env())
        return {name: None for name in names if is_loader_variable(name)}

    def _root_exec(self, cmd: list[str], stdin: bytes | None = None) -> ExecOutput:
        self._refuse_root_after_user_code()
        return self._box.exec(ExecConfig(cmd, user="0", stdin=stdin, env=self._root_env()))

    def _root_daemon(self, cmd: list[str], config: Mapping[str, Any]) -> dict[str, Any]:
        # The same guard as every root exec: a daemon is a root process that stays.
        self._refuse_root_after_user_code()
        # with_stderr: the forwarder's config holds socket paths only, no secret.
        cfg = ExecConfig(cmd, user="0", env=self._root_env(), timeout=30)
        return start_daemon(self._box, cfg, config, with_stderr=True)

    def _root_json(self, cmd: list[str], stdin: bytes | None = None) -> dict[str, Any]:
        out = self._root_exec(cmd, stdin)
        try:
            return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            raise HardeningError(_root_step_failure(cmd, out)) from None

    def _use_ca_bundle(self) -> None:
        # The hardening step wrote one bundle (system CAs plus the extra ones, readable by
        # the agent); these are the variables the usual clients read.
        for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT",
                    "NODE_EXTRA_CA_CERTS"):  # fmt: skip
            self._env[var] = self._ca_bundle

    def _start_sidecar(self, owner: paths.Owner, agent_allow: list[str], routes: list) -> None:
        assert self.volume is not None  # made first, in _setup
        with self._step("sidecar (parallel)"):
            self.sidecar = self.backend.start_sidecar(
                self.config, owner, self.volume,
                agent_allow=agent_allow, routes=routes, token=self._token,
            )  # fmt: skip

    def _start_forwarder(self, egress: bool, routes: list[dict[str, Any]]) -> None:
        """The root forwarder: 127.0.0.1 ports relayed to the sidecar's root-only sockets.

        It binds before any user code runs, so nothing the agent starts can take its
        ports; it holds no secret (the keys stay in the sidecar).
        """
        assert self.sidecar is not None  # only called with one
        side, mine = self.sidecar.socket_dir, self._egress_dir  # the volume, there and here

        def here(path: str) -> str:
            return path.replace(side, mine)

        socks = [{"name": "egress:agent", "unix": f"{mine}/egress.sock"}] if egress else []
        for r in routes:
            path = here(self.sidecar.key_socket(r["name"]))
            socks.append({"name": "keys:" + r["name"], "unix": path})
        cfg: dict[str, Any] = {"routes": socks}
        if handoff := self.sidecar.handoff_socket():
            cfg["handoff"] = here(handoff)
        cmd = [self._python, "-I", "-S", f"{self._tools_dir}/egressproxy.py", "forward"]
        ready = self._root_daemon(cmd, cfg)
        if not ready.get("ready"):
            why = ready.get("error") or "no ready line"
            raise KeyProxyError(f"the sandbox's forwarder did not start: {why}")
        # "ok": the sidecar accepts on these ports itself; else why the forwarder relays.
        self.forwarding = (
            "handed over"
            if ready.get("handoff") == "ok"
            else (f"relayed ({ready.get('handoff') or 'no handoff socket'})")
        )
        ports = {str(k): int(v) for k, v in ready["ports"].items()}
        if egress:
            url = f"http://127.0.0.1:{ports['egress:agent']}"
            for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
                self._env[var] = url
            self._env["NO_PROXY"] = self._env["no_proxy"] = "127.0.0.1,localhost"
        self.proxy_ports = {k[5:]: v for k, v in ports.items() if k.startswith("keys:")}
        for r in self.config.key_routes:
            if r.provider in self.proxy_ports:
                self._env[r.env_var] = self._token
                self._env[r.base_url_env] = (
                    f"http://127.0.0.1:{self.proxy_ports[r.provider]}{r.base_path}"
                )

    # ---- code and state ------------------------------------------------------------

    def _upload_code(self) -> None:
        uid, gid = self.user["uid"], self.user["gid"]
        app = self.workdir.rsplit("/", 1)[1]
        # The engine extracts it (root here holds no CAP_DAC_OVERRIDE and the home may
        # be 0700); the tar's own entry for app/ makes the directory, owned by the user.
        if self.config.code_dir is not None:
            data = tools.tar_directory(self.config.code_dir, uid=uid, gid=gid, prefix=app)
        else:
            data = tools.tar_bytes([], uid=uid, gid=gid, dirs=[(app, 0o755)])
        if not self._put_home(data, "the code directory"):
            raise AgentboxError(f"could not create {self.workdir} in the sandbox")

    def _put_home(self, data: Any, what: str) -> bool:
        """Unpack a tar into the home through the engine, naming the cap when it is full."""
        try:
            return self._box.put_archive(self.home, data)
        except Exception as exc:
            if "no space left on device" not in str(exc).lower():
                raise
            cap = format_size(self.config.resources.disk_bytes)
            raise AgentboxError(
                f"{what} does not fit into the sandbox's home ({cap} cap). Raise "
                "resources.disk (and memory with it: the home is held in memory)."
            ) from None

    def _restore_state(self) -> None:
        from pytest_agentbox import state

        store = self.config.state_store
        stored = store.load(self.config.state_scope)
        if stored is None:
            return
        limits = self.config.state_limits or state.Limits()
        with tempfile.TemporaryFile() as clean, open(stored, "rb") as src:
            if src.read(512).count(0) == 512:  # a saved state with nothing in it
                return
            src.seek(0)
            # Cleaned again on the way in: the store is a file on disk that anything
            # with the user's rights could have replaced since it was written.
            report = state.clean_tar(src, clean, limits=limits, uid=self.user["uid"],
                                     gid=self.user["gid"])  # fmt: skip
            clean.seek(0)
            self._put_home(clean, f"the stored state of {self.config.state_scope!r}")
        if report.dropped:
            self.warnings.append(f"state restore dropped: {report.summary()}")

    def _snapshot_state(self) -> None:
        from pytest_agentbox import state

        try:
            report = state.snapshot_container(
                self._box, self.home, self.config.state_store, self.config.state_scope,
                limits=self.config.state_limits or state.Limits(),
                uid=self.user["uid"], gid=self.user["gid"],
            )  # fmt: skip
        except Exception as exc:
            self.state_report = f"not saved, previous state kept: {exc}"
            raise
        self.state_report = report.summary()

    def _run_setup_command(self, command: str) -> None:
        if self.config.progress:
            self.config.progress(f"agentbox: running setup_command: {command}")
        result = self.run(command, timeout=self.config.setup_timeout)
        if result.exit_code != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise SetupCommandFailed(
                f"setup_command failed with exit code {result.exit_code} "
                f"({'timed out' if result.timed_out else 'as user ' + self.user['name']}): "
                f"{command}\n--- last output ---\n{tail}"
            )

    # ---- the user-facing API -------------------------------------------------------

    def _user_env(self, env: Mapping[str, str] | None) -> dict[str, str | None]:
        """The runner's exec environment: the agent's, minus every loader variable.

        The loader and libc act on LD_PRELOAD, GCONV_PATH, MALLOC_* ... as the runner's
        interpreter starts, before its seccomp filter is in: the runner gets none of them
        (None unsets one the image's ENV sets, which every exec inherits) and hands the
        real values, the image's included, to the command alone.
        """
        from pytest_agentbox.inside.runner import CHILD_ENV, is_loader_variable

        merged: dict[str, str | None] = dict(self._env)
        if env:
            merged.update(env)
        image = dict(v.split("=", 1) for v in self._container_env() if "=" in v)
        handed = {k: v for k, v in image.items() if is_loader_variable(k)}
        handed.update({k: v for k, v in merged.items() if is_loader_variable(k) and v is not None})
        for name in {*handed, *(k for k in merged if is_loader_variable(k))}:
            merged[name] = None
        merged[CHILD_ENV] = json.dumps(handed)
        return merged

    def _container_env(self) -> list[str]:
        # What the engine gives every exec in this container before ours: image ENV
        # merged with the create-time environment (read once, at creation).
        return list(self.box.env) if self.box is not None else []

    def _user_argv(self, mode: str, *args: str) -> list[str]:
        """argv of one runner call: the only way anything runs as the user."""
        # Absolute interpreter checked by hardening (root-owned, in root-owned dirs): a
        # planted python3 could otherwise start the agent without the seccomp filter.
        return [self._runner_python, "-I", "-S", "-c", _runner_source(), mode, *args]

    def _user_exec(
        self,
        argv: list[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        deadline: float,
    ) -> ExecOutput:
        """One runner exec as the user, given up ``deadline`` seconds after it starts.

        The runner enforces a command's own limit, but the agent can stop the runner:
        only the host's clock is sure. Past the deadline the exec is left running (no
        root exec may end it: user code has run) and the output says so.
        """
        self._user_code_ran = True
        out = self._box.exec(ExecConfig(
            argv, user=self.user_spec, env=self._user_env(env), workdir=cwd or self.workdir,
            stdin=stdin, timeout=None, deadline=deadline,
        ))  # fmt: skip
        self._unanswered |= out.deadline_passed
        return out

    def _stalled(self, what: str, seconds: float) -> str:
        return (
            f"agentbox: the sandbox's runner stopped answering: {what} gave no result within "
            f"{seconds:g}s (the agent may have stopped it, e.g. with kill -STOP); the host "
            "stopped waiting, and its processes may run on until the sandbox is removed"
        )

    def _user_command(
        self,
        command: str | Sequence[str],
        *,
        timeout: float | None,
    ) -> tuple[str, list[str], float]:
        """(display text, runner argv, time limit) for a user command."""
        if isinstance(command, str):
            text, argv = command, ["/bin/sh", "-c", command]
        else:
            argv = [str(a) for a in command]
            text = shlex.join(argv)
        limit = self.config.timeout if timeout is None else check_timeout(timeout)
        return text, self._user_argv("run", str(limit), *argv), limit

    def run(
        self,
        command: str | Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> CommandResult:
        """Run ``command`` (a shell string or an argv list) as the unprivileged user.

        A command still running after ``timeout`` seconds (default: the sandbox's) is
        killed with every process it started; the result then has ``timed_out`` set and
        exit code 124. Each stream keeps its first 16 MiB; the rest is counted in
        ``stdout_dropped`` / ``stderr_dropped`` and marked at the end of the text.
        """
        text, cmd, limit = self._user_command(command, timeout=timeout)
        start = time.monotonic()
        out = self._user_exec(cmd, env=env, cwd=cwd, deadline=limit + RUNNER_GRACE)
        texts = [b.decode("utf-8", "replace") for b in (out.stdout, out.stderr)]
        if out.deadline_passed:
            texts[1] += "\n" + self._stalled(f"a command with a {limit:g}s limit",
                                             limit + RUNNER_GRACE) + "\n"  # fmt: skip
        for i, n in enumerate(out.dropped):
            if n:
                name = ("stdout", "stderr")[i]
                texts[i] += f"\n[agentbox: {n} more bytes of {name} dropped past the output cap]\n"
        stdout, stderr = texts
        result = CommandResult(
            command=text,
            exit_code=124 if out.deadline_passed else out.exit_code,
            stdout=stdout,
            stderr=stderr,
            duration=time.monotonic() - start,
            timed_out=out.deadline_passed
            or (out.exit_code == 124 and b"agentbox: command timed out" in out.stderr),
            stdout_dropped=out.dropped[0],
            stderr_dropped=out.dropped[1],
        )
        self.history.append(_for_history(result, self._history_margin()))
        return result

    def _history_margin(self) -> int:
        """Bytes dropped after a history cut: more than any form of any secret here."""
        longest = max([len(k) for k in self.config.keys.values()] + [len(self._token)])
        return LEAK_FORM_FACTOR * longest + 8

    def spawn(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> Spawned:
        """Start a long-running process that speaks newline-delimited JSON on stdin/stdout."""
        text, cmd, _limit = self._user_command(command, timeout=timeout)
        self._user_code_ran = True
        started = self._box.exec_stream(ExecConfig(
            cmd, user=self.user_spec, env=self._user_env(env), workdir=cwd or self.workdir,
            timeout=None, deadline=RUNNER_GRACE,
        ))  # fmt: skip
        if started is None:
            raise AgentboxError(self._stalled(f"spawn({text!r})", RUNNER_GRACE))
        return Spawned(self, text, started)

    @property
    def _io_deadline(self) -> float:
        return self.config.timeout + RUNNER_GRACE

    def _raise_if_stalled(self, out: ExecOutput, what: str) -> None:
        if out.deadline_passed:
            raise AgentboxError(self._stalled(what, self._io_deadline))

    def write_file(self, path: str, data: bytes | str) -> None:
        """Write ``data`` to ``path`` as the user (relative paths are under the code dir)."""
        raw = data.encode() if isinstance(data, str) else data
        out = self._user_exec(self._user_argv("write", path), stdin=raw, deadline=self._io_deadline)
        self._raise_if_stalled(out, f"write_file({path!r})")
        if out.exit_code != 0:
            raise AgentboxError(f"write_file({path!r}) failed: {out.stderr.decode().strip()}")

    def read_file(self, path: str) -> bytes:
        """Read ``path`` as the user; raises FileNotFoundError or PermissionError like open()."""
        argv = self._user_argv("run", str(self.config.timeout), "cat", "--", path)
        out = self._user_exec(argv, deadline=self._io_deadline)
        self._raise_if_stalled(out, f"read_file({path!r})")
        if out.dropped[0]:
            raise AgentboxError(
                f"read_file({path!r}): larger than the {MAX_OUTPUT // 2**20} MiB a read "
                "keeps; read it in parts (e.g. sandbox.run('tail -c ...'))"
            )
        if out.exit_code != 0:
            msg = out.stderr.decode(errors="replace").strip()
            if "Permission denied" in msg:
                raise PermissionError(f"{path}: permission denied in the sandbox")
            raise FileNotFoundError(f"{path}: {msg or 'not readable'} in the sandbox")
        return out.stdout

    def upload(self, local_dir: str | Path, remote_dir: str) -> None:
        """Copy a host directory into ``remote_dir``, unpacked by the user (never by root).

        Whatever the agent did to that path (a symlink swapped in meanwhile, say), the
        files land only where the user could have written them itself.
        """
        target = remote_dir if remote_dir.startswith("/") else f"{self.workdir}/{remote_dir}"
        data = tools.tar_directory(
            Path(local_dir), uid=self.user["uid"], gid=self.user["gid"], skip=set()
        )
        out = self._user_exec(self._user_argv("extract", target), stdin=data,
                              deadline=self._io_deadline)  # fmt: skip
        self._raise_if_stalled(out, f"upload into {target}")
        if out.exit_code != 0:
            raise AgentboxError(
                f"upload into {target} failed as the sandbox user: "
                f"{out.stderr.decode(errors='replace').strip()}"
            )

    def exec_hint(self) -> str:
        """The command that steps into this sandbox as the unprivileged user."""
        return self._box.enter_hint(self.user_spec, self.workdir)

    # ---- teardown ----------------------------------------------------------------

    def collect_logs(self) -> dict[str, str]:
        """The key proxy's request log and the egress decisions (never keys or tokens).

        Read from the sidecar through the engine's archive API (no process runs for it,
        least of all in the agent's container). Once the sandbox is gone, the last copy
        read is kept.
        """
        logs = dict(self.logs)
        if self.sidecar is not None:
            with contextlib.suppress(Exception):
                if self.proxy_ports:
                    logs["key proxy requests"] = self.sidecar.key_requests()
                # The agent's connections and the key proxy's upstream ones alike.
                text = logs["egress decisions"] = self.sidecar.decisions()
                from pytest_agentbox.policy.egress import open_tunnels

                if still := open_tunnels(text):
                    logs["egress tunnels open at teardown"] = "\n".join(
                        f"{t.get('host')}:{t.get('port')} ({t.get('listener')}, id {t.get('id')})"
                        for t in still
                    )
        if full := self._storage_full():
            logs["storage"] = full
        if oom := self._oom_report():
            logs["memory"] = oom
        self.logs = logs
        return logs

    def memory_events(self) -> dict[str, Any]:
        """Out-of-memory kills seen so far: ``oom_killed`` (the engine's word: the
        container itself ended for memory) and ``oom_kills`` (processes the kernel killed
        in the sandbox's memory cgroup, read as the user; None when it cannot tell).

        {} once the container is gone; nothing is asked of a sandbox whose runner
        stopped answering (both then stay unknown: False and None).
        """
        if self.box is None:
            return {}
        found: dict[str, Any] = {"oom_killed": False, "oom_kills": None}
        if self._runner_python and not self._unanswered:
            argv = ["/bin/cat", "/sys/fs/cgroup/memory/memory.oom_control"]
            with contextlib.suppress(Exception):
                limit = str(TEARDOWN_BUDGET)
                out = self._user_exec(self._user_argv("run", limit, *argv),
                                      deadline=TEARDOWN_BUDGET)  # fmt: skip
                for line in out.stdout.decode(errors="replace").splitlines()[:16]:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill" and value.strip().isdigit():
                        found["oom_kills"] = int(value)
        # The engine's word after ours: an inspect while an exec start is stuck would
        # wait on it (and hold up the container's removal).
        if not self._unanswered:
            with contextlib.suppress(Exception):
                found["oom_killed"] = self.box.state().oom_killed
        return found

    def _oom_report(self) -> str:
        """What the kernel killed for memory, for the report ("" when nothing)."""
        events = self.memory_events()
        mem = self.config.resources.memory
        if events.get("oom_killed"):
            return (
                f"memory: the sandbox was killed for memory ({mem} limit). Raise "
                "resources.memory (the home and /tmp count against it too)."
            )
        if events.get("oom_kills"):
            return (
                f"memory: the kernel killed {events['oom_kills']} process(es) in the sandbox "
                f"for memory ({mem} limit; files in the home, /tmp and /dev/shm count "
                "against it). Raise resources.memory."
            )
        return ""

    def storage_usage(self) -> dict[str, tuple[int, int]]:
        """Bytes used and the cap, per writable place (the home and ``/tmp``).

        Read as the agent user (through the runner, like any user command), so it is
        what the agent itself would see; {} when the sandbox cannot answer.
        """
        if (
            self.box is None
            or not self._runner_python
            or not self.storage_volumes
            or self._unanswered
        ):
            return {}
        script = (
            "import json,os,sys\n"
            "out={}\n"
            "for p in sys.argv[1:]:\n"
            " s=os.statvfs(p); out[p]=[(s.f_blocks-s.f_bfree)*s.f_frsize,s.f_blocks*s.f_frsize]\n"
            "print(json.dumps(out))"
        )
        argv = [self._runner_python, "-I", "-S", "-c", script, self.home, "/tmp"]
        try:
            limit = str(TEARDOWN_BUDGET)
            out = self._user_exec(self._user_argv("run", limit, *argv), deadline=TEARDOWN_BUDGET)
            found = json.loads(out.stdout.decode()[:4096])
            return {str(k): (int(v[0]), int(v[1])) for k, v in found.items()}
        except Exception:  # the agent's user could have broken it: a report, not a verdict
            return {}

    def _storage_full(self) -> str:
        """Which writable places are (nearly) full, for the report ("" when none is)."""
        lines = []
        for path, (used, cap) in self.storage_usage().items():
            if cap and cap - used < max(4096, cap // 100):
                lines.append(
                    f"storage: {path} full ({format_size(cap)} cap): writes there failed with "
                    "'No space left on device'. Raise resources.disk (and memory with it: "
                    "the home and /tmp are held in memory)."
                )
        return "\n".join(lines)

    def close(self, *, keep: bool = False) -> None:
        """Snapshot state and remove everything; ``keep`` leaves it running.

        Logs are not read here: only a failing test's report needs them, and it reads
        them before teardown (a passing test pays no extra round trips).
        """
        if self._closed:
            return
        self._closed = True
        if self._unanswered and self._channel is not None:
            # A runner that stopped answering may mean an agent stopping every process
            # of its user, an exec's ``runc init`` included: the engine then waits on
            # that exec and holds the snapshot and removal up for minutes. The main
            # process (root, its stdin ours alone) ends every other process, as for a
            # kept sandbox (the in-memory home stays); no exec, nothing the agent could
            # have touched.
            with contextlib.suppress(OSError):
                self._channel.sendall(_KEEP)
                time.sleep(0.5)
        errors: list[str] = []
        store = self.config.state_store
        if self.box is not None and self.config.state_scope and store is not None:
            try:
                self._snapshot_state()
            except Exception as exc:  # the previous state stays intact
                errors.append(f"state snapshot failed, previous state kept: {exc}")
        if keep:
            self._keep()
            self.warnings += errors
            return

        def remove(obj: Box | Sidecar) -> None:
            with contextlib.suppress(Exception):
                obj.remove()

        # Box and sidecar go side by side; the volumes once both are gone.
        boxes: list[Box | Sidecar | None] = [self.box, self.sidecar]
        with ThreadPoolExecutor(max_workers=2) as pool:
            pool.map(remove, [o for o in boxes if o is not None])
        if self._channel is not None:
            with contextlib.suppress(OSError):
                self._channel.close()
        if self.sidecar is not None:
            self.sidecar.close()
        for vol in [self.volume, *self.storage_volumes]:
            if vol is not None:
                with contextlib.suppress(Exception):
                    vol.remove()
        if self.box is not None:
            with _LIVE_LOCK:
                _LIVE.pop(self.box.id, None)
        self.warnings += errors

    def _keep(self) -> None:
        """Leave the agent's container for a person to step into, without its keys.

        The sidecar ends now (keys never outlive the test). The main process is told to
        end every other process and stay up once our attach socket closes (it does when
        this process exits). No restart: the home and /tmp are in memory and would be
        lost, and no root exec: user code has run.
        """
        if self.sidecar is not None:
            self.sidecar.close()
        if self._channel is not None:
            with contextlib.suppress(OSError):
                self._channel.sendall(_KEEP)  # read before the end-of-file that follows
            with contextlib.suppress(OSError):
                self._channel.close()
        if self.box is not None:
            with contextlib.suppress(Exception):
                time.sleep(0.3)
                if self.box.state().status != "running":
                    self.warnings.append(
                        "the kept sandbox stopped (its image has no /bin/sleep to wait with): "
                        "its in-memory home and /tmp are gone"
                    )

    def __enter__(self) -> Sandbox:
        if self.box is None:  # made by the constructor: nothing was created or hardened
            raise AgentboxError(
                "this Sandbox was never set up: use `with Sandbox.create(config) as sb:` "
                "(Sandbox(...) itself creates no box)"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        cid = self.box.short_id if self.box is not None else "-"
        return f"<Sandbox {cid} image={self.config.image!r}>"


# The longest spelling of a secret the report's redactor knows, per character of it:
# base64 of a JSON text whose every character is a \u00XX escape (6 * 4/3).
LEAK_FORM_FACTOR = 8


def _tail_text(text: str, limit: int, margin: int = 0) -> tuple[str, int]:
    """The end of ``text`` within ``limit`` UTF-8 bytes, and how many bytes were cut.

    When it cuts, ``margin`` more bytes go after the cut: whatever part of a secret the
    cut left at the start is shorter than that, so no remnant the redactor could not
    recognise stays behind.
    """
    data = text.encode()
    if len(data) <= limit:
        return text, 0
    tail = data[-limit:][margin:].decode("utf-8", "ignore")
    return tail, len(data) - len(tail.encode())


def _for_history(result: CommandResult, margin: int = 0) -> CommandResult:
    """``result`` as the history keeps it: each stream's tail, cuts counted and marked.

    ``margin``: at least the longest form any secret of the sandbox leaks in.
    """
    limit = HISTORY_BYTES // (2 * HISTORY_LENGTH)
    out, cut_out = _tail_text(result.stdout, limit, margin)
    err, cut_err = _tail_text(result.stderr, limit, margin)
    if not (cut_out or cut_err):
        return result

    def mark(cut: int, name: str, text: str) -> str:
        return f"[agentbox: {cut} earlier bytes of {name} not kept in the history]\n{text}"

    return replace(
        result,
        stdout=mark(cut_out, "stdout", out) if cut_out else out,
        stderr=mark(cut_err, "stderr", err) if cut_err else err,
        stdout_dropped=result.stdout_dropped + cut_out,
        stderr_dropped=result.stderr_dropped + cut_err,
    )


class Spawned:
    """A long-running process in a sandbox, talking newline-delimited JSON.

    Bounded on the host: while SPAWN_BUFFER bytes of stdout lines wait unread, nothing
    more is read (the process blocks on its writes until the test reads); a line keeps
    its first SPAWN_LINE bytes and stderr its last SPAWN_STDERR, the rest counted in
    ``stdout_dropped`` / ``stderr_dropped``.
    """

    def __init__(self, sandbox: Sandbox, command: str, stream: ExecStream) -> None:
        self.sandbox = sandbox
        self.command = command
        self._stream = stream
        self._lines: deque[str | None] = deque()
        self._pending = 0  # bytes of the lines in _lines
        self._cond = threading.Condition()
        self._closing = False
        self._stderr = bytearray()
        self.stdout_dropped = 0  # bytes of over-long lines not kept
        self.stderr_dropped = 0  # bytes of stderr before the tail that is kept
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _put(self, line: str | None) -> None:
        size = len(line) if line else 0
        with self._cond:
            # Back-pressure, not loss: the test reads at its pace (closing stops waiting).
            while self._pending and self._pending + size > SPAWN_BUFFER and not self._closing:
                self._cond.wait()
            if self._closing and line is not None:
                return  # nobody will read it
            self._lines.append(line)
            self._pending += size
            self._cond.notify_all()

    def _keep_stderr(self, data: bytes) -> None:
        self._stderr.extend(data)
        excess = len(self._stderr) - SPAWN_STDERR
        if excess > 0:
            del self._stderr[:excess]
            self.stderr_dropped += excess

    def _read(self) -> None:
        buf = bytearray()
        try:
            for stream, data in self._stream.frames():
                if stream == 2:
                    self._keep_stderr(data)
                    continue
                while data:
                    i = data.find(b"\n")
                    part, data = (data, b"") if i < 0 else (data[:i], data[i + 1 :])
                    room = max(0, SPAWN_LINE - len(buf))
                    buf += part[:room]
                    self.stdout_dropped += max(0, len(part) - room)
                    if i >= 0:
                        self._put(buf.decode("utf-8", "replace"))
                        buf = bytearray()
        except OSError:
            pass
        if buf:
            self._put(buf.decode("utf-8", "replace"))
        self._put(None)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of stdout lines read from the process and not yet taken by the test."""
        with self._cond:
            return self._pending

    def send(self, message: str | Mapping[str, Any]) -> None:
        """Write one line (a dict is sent as JSON) to the process's stdin."""
        line = message if isinstance(message, str) else json.dumps(message)
        self._stream.sendall(line.encode() + b"\n")

    def readline(self, timeout: float = 30.0) -> str | None:
        """The next stdout line, or None at end of output; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._lines:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no output line within {timeout}s from: {self.command}")
                self._cond.wait(left)
            line = self._lines.popleft()
            if line is None:
                self._lines.appendleft(None)  # the end stays the end for every later call
                return None
            self._pending -= len(line)
            self._cond.notify_all()
            return line

    def read_json(self, timeout: float = 30.0) -> Any:
        """The next stdout line parsed as JSON (blank lines skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.01, deadline - time.monotonic()))
            if line is None:
                raise EOFError(f"process ended: {self.command}; stderr: {self.stderr[-500:]}")
            if line.strip():
                return json.loads(line)

    @property
    def stderr(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    def close(self, timeout: float = 10.0) -> int:
        """Close stdin, wait up to ``timeout`` for the process to end; its exit code, or -1
        when it has not ended by then (it is left running)."""
        with self._cond:
            self._closing = True  # a reader waiting for room drops the rest instead
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._stream.shutdown_write()
        self._reader.join(timeout)
        ended = not self._reader.is_alive()
        with contextlib.suppress(OSError):
            self._stream.close()
        # Output still open after ``timeout``: the process runs on (or its runner was
        # stopped by the agent); one look, no 30 s wait for an exit that is not coming.
        wait = 30.0 if ended else 0.0
        return self._stream.exit_code(wait=wait)

    def __enter__(self) -> Spawned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_all() -> None:
    """Remove every sandbox this process still holds (session end, Ctrl-C, exit)."""
    with _LIVE_LOCK:
        live = list(_LIVE.values())
    for sb in live:
        with contextlib.suppress(Exception):
            sb.close()
