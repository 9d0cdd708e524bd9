"""The hardened sandbox: container lifecycle, the ordered setup, and the ``Sandbox`` API.

Usable without pytest::

    from pytest_agentbox import SandboxConfig, Sandbox
    with Sandbox.create(SandboxConfig(image="agentbox/base:bookworm")) as sb:
        print(sb.run("id -u").stdout)

Setup order (any failure removes everything made so far): container (non-root user for
all user code, no-new-privileges, capabilities dropped, limits, allowlisted env, owner
labels) -> start -> hardening as root -> agent code and persisted state -> egress
forwarder and key proxy as root -> ``setup_command`` as the user. When traffic may
leave, the egress sidecar starts in a thread meanwhile; the forwarder waits for it.
"""

from __future__ import annotations

import contextlib
import json
import queue
import secrets
import shlex
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import engine, hardening, paths
from .engine import DEFAULT_IMAGE
from .errors import AgentboxError, HardeningError, KeyProxyError, SetupCommandFailed
from .manifest import KeyRoute, Resources

DEFAULT_TIMEOUT = 300.0

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

# The root steps need these and nothing else: SYS_ADMIN for the hidepid remount,
# CHOWN/FOWNER to create the user's home and strip setuid bits from files root does not
# own. User processes never hold them: non-root + no-new-privileges clears them.
HARDENING_CAPS = ("SYS_ADMIN", "CHOWN", "FOWNER")

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs each user command in its own session and kills the whole group on timeout, so a
# timed-out command leaves nothing behind. Passed with -c: no file to plant or replace.
# A blocking wait plus SIGALRM sees the command's end at once (Popen.wait with a timeout
# polls, up to 50 ms late on every command).
_RUNNER = (
    "import os,signal,subprocess,sys\n"
    "t=float(sys.argv[1]);p=subprocess.Popen(sys.argv[2:],start_new_session=True);k=[]\n"
    "def kill(*_):\n"
    " k.append(1)\n"
    " try:os.killpg(p.pid,signal.SIGKILL)\n"
    " except OSError:pass\n"
    "signal.signal(signal.SIGALRM,kill);signal.setitimer(signal.ITIMER_REAL,max(t,1e-3))\n"
    "r=p.wait();signal.setitimer(signal.ITIMER_REAL,0)\n"
    "if k:\n"
    " sys.stderr.write('agentbox: command timed out after %gs and was killed\\n'%t)\n"
    " sys.exit(124)\n"
    "sys.exit(r)\n"
)

# Sandboxes of this process that are not yet removed: swept at session end and exit,
# so Ctrl-C or an error between steps never leaves a container running.
_LIVE: dict[str, Sandbox] = {}
_LIVE_LOCK = threading.Lock()

# Image id -> the setuid/setgid files its first sandbox in this process found; later
# sandboxes of the same (immutable) image strip and verify that list without a rescan.
_SETID_SCANS: dict[str, list[str]] = {}


@dataclass(frozen=True)
class CommandResult:
    """The outcome of :meth:`Sandbox.run`."""

    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class SandboxConfig:
    """Everything a sandbox is made from; the plugin builds it from manifest and markers."""

    image: str = DEFAULT_IMAGE
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
    extra_ca_pem: str | None = None
    state_scope: str | None = None
    state_store: Any = None  # state.StateStore
    state_limits: Any = None  # state.Limits
    timeout: float = DEFAULT_TIMEOUT
    setup_timeout: float = 900.0
    run_id: str = field(default_factory=paths.token)
    host_env: Mapping[str, str] | None = None  # defaults to os.environ
    progress: Callable[[str], None] | None = None


@dataclass
class Step:
    name: str
    seconds: float


class Sandbox:
    """A running, hardened sandbox. Create it with :meth:`Sandbox.create`."""

    def __init__(self, config: SandboxConfig, client: Any) -> None:
        self.config = config
        self._client = client
        self.container: Any = None
        self.sidecar: Any = None
        self.volume: Any = None
        self.user: dict[str, Any] = {"name": config.user, "uid": config.uid, "gid": config.uid}
        self.home = f"/home/{config.user}"
        self.workdir = f"{self.home}/app"
        self.steps: list[Step] = []
        self.warnings: list[str] = []
        self.history: deque[CommandResult] = deque(maxlen=20)
        self.proxy_ports: dict[str, int] = {}
        self.state_report: str = ""
        self.logs: dict[str, str] = {}
        self._env: dict[str, str] = {}
        self._tools_dir = f"/run/agentbox-{paths.token()}"
        self._egress_dir = f"/run/agentbox-egress-{paths.token()}"
        self._ca_bundle = f"{self._tools_dir}-ca.pem"
        self._closed = False
        self.setup_seconds = 0.0

    # ---- creation --------------------------------------------------------------

    @classmethod
    def create(
        cls,
        config: SandboxConfig,
        client: Any = None,
        *,
        on_created: Callable[[Sandbox], None] | None = None,
    ) -> Sandbox:
        """Create, harden and set up a sandbox; on any failure nothing is left behind.

        ``on_created`` receives the sandbox before any step runs, so a caller's teardown
        can find it (and its report sections) even when setup fails.
        """
        client = client or engine.get_client()
        sb = cls(config, client)
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

    def _setup(self) -> None:
        cfg = self.config
        engine.ensure_image(self._client, cfg.image)
        owner = paths.Owner.current(cfg.run_id)
        filtering = cfg.egress is not None and cfg.egress.enabled and not cfg.egress.unrestricted
        if filtering:
            from . import sidecar

            self.volume = sidecar.create_volume(self._client, owner)
        # The sidecar needs nothing from the sandbox but the volume: its ~0.5 s of engine
        # work overlaps the sandbox's own. Leaving the block waits for it, whatever
        # happened, so close() always sees it.
        with ThreadPoolExecutor(max_workers=1) as pool:
            sidecar_started = pool.submit(self._start_sidecar, owner) if filtering else None
            with self._step("create container"):
                self._create_container(owner)
            with self._step("harden"):
                report = self._harden()
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
        if filtering:
            with self._step("egress forwarder"):
                self._start_forwarder()
        if cfg.key_routes:
            with self._step("key proxy"):
                self._start_key_proxy(filtering)
        if cfg.setup_command:
            with self._step("setup_command"):
                self._run_setup_command(cfg.setup_command)

    def _harden(self) -> dict[str, Any]:
        image_id = str(self.container.attrs.get("Image", ""))
        daemons = ["keyproxy.py"] if self.config.key_routes else []
        if self.volume is not None:
            daemons.append("egressproxy.py")
        opts = {
            "user": self.config.user,
            "uid": self.config.uid,
            "tools_dir": self._tools_dir,
            # Written by root into the 0700 directory: no archive upload (each costs the
            # engine a process start), and the agent can neither read nor replace them.
            "tools": {name: engine.tool_source(name).decode() for name in daemons},
            "app": "app" if self.config.code_dir is None else None,
            "setid": _SETID_SCANS.get(image_id),
            "ca": {"path": self._ca_bundle, "pem": self.config.extra_ca_pem}
            if self.config.extra_ca_pem
            else None,
        }
        argv, source = engine.tool_command("hardening.py")
        report = self._root_json(argv, stdin=source + json.dumps(opts).encode() + b"\n")
        self.user = report["user"]
        self.home = self.user["home"]
        self.workdir = f"{self.home}/app"
        self.warnings += hardening.check(report, keys_in_use=bool(self.config.key_routes))
        if image_id and "found" in report:
            _SETID_SCANS.setdefault(image_id, list(report["found"]))
        return report

    def _create_container(self, owner: paths.Owner) -> None:
        cfg = self.config
        res = cfg.resources
        unrestricted = cfg.egress is not None and cfg.egress.unrestricted
        volumes = {}
        if self.volume is not None:
            volumes[self.volume.name] = {"bind": self._egress_dir, "mode": "rw"}
        self.container = self._client.containers.create(
            cfg.image,
            command=["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600; done"],
            name=paths.unique_name("sandbox"),
            hostname="agentbox",
            user="0",
            init=True,
            environment=self._create_env(),
            labels=owner.labels("sandbox"),
            network_mode=cfg.egress_network if unrestricted else "none",
            cap_drop=["ALL"],
            cap_add=list(cfg.cap_add),
            security_opt=["no-new-privileges"],
            mem_limit=res.memory,
            memswap_limit=res.memory,
            nano_cpus=int(res.cpus * 1e9),
            pids_limit=res.pids,
            volumes=volumes,
            detach=True,
        )
        self._register()
        self.container.start()

    def _register(self) -> None:
        with _LIVE_LOCK:
            _LIVE[self.container.id] = self

    # ---- environment -----------------------------------------------------------

    def _create_env(self) -> dict[str, str]:
        import os

        host = os.environ if self.config.host_env is None else self.config.host_env
        env = {k: host[k] for k in FORWARDED_ENV if k in host}
        env["PATH"] = _PATH
        return env

    def _base_env(self) -> dict[str, str]:
        env = self._create_env()
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
        return str(self.container.id)

    @property
    def user_spec(self) -> str:
        return f"{self.user['uid']}:{self.user['gid']}"

    # ---- root steps --------------------------------------------------------------

    def _root_exec(self, cmd: list[str], stdin: bytes | None = None) -> engine.ExecOutput:
        return engine.exec_run(self._client, self.container.id, cmd, user="0", stdin=stdin)

    def _root_json(self, cmd: list[str], stdin: bytes | None = None) -> dict[str, Any]:
        out = self._root_exec(cmd, stdin)
        try:
            return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            tail = out.stderr.decode(errors="replace")[-500:]
            raise HardeningError(
                f"sandbox root setup step failed (exit {out.exit_code}): {tail.strip()}. "
                "The image needs python3 and a POSIX shell."
            ) from None

    def _use_ca_bundle(self) -> None:
        # The hardening step wrote one bundle (system CAs plus the extra ones, readable by
        # the agent); these are the variables the usual clients read.
        for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT",
                    "NODE_EXTRA_CA_CERTS"):  # fmt: skip
            self._env[var] = self._ca_bundle

    def _start_root_daemon(self, script: str, config: dict[str, Any], *args: str) -> dict[str, Any]:
        cmd = ["python3", "-I", "-S", f"{self._tools_dir}/{script}", *args]
        ready = engine.start_daemon(self._client, self.container.id, cmd, config)
        if not ready:
            raise KeyProxyError(f"the sandbox's {script} did not start (no ready line)")
        return ready

    def _start_key_proxy(self, via_egress: bool) -> None:
        cfg = self.config
        token = secrets.token_hex(16)  # 128-bit session token
        routes = [
            {"name": r.provider, "domain": r.domain, "auth_style": r.auth_style,
             "key": cfg.keys[r.provider]}
            for r in cfg.key_routes
            if r.provider in cfg.keys
        ]  # fmt: skip
        self._proxy_log = f"{self._tools_dir}/keyproxy-requests.jsonl"
        ready = self._start_root_daemon(
            "keyproxy.py",
            {
                "token": token,
                "routes": routes,
                "upstream_port": 443,
                "upstream_proxy": {"host": "127.0.0.1", "port": self._forward_port}
                if via_egress
                else None,
                "ca_pem": cfg.extra_ca_pem,
                "log_path": self._proxy_log,
            },
        )
        self.proxy_ports = {str(k): int(v) for k, v in ready["ports"].items()}
        for r in cfg.key_routes:
            if r.provider in self.proxy_ports:
                self._env[r.env_var] = token
                self._env[r.base_url_env] = (
                    f"http://127.0.0.1:{self.proxy_ports[r.provider]}{r.base_path}"
                )

    # ---- egress ------------------------------------------------------------------

    def _start_sidecar(self, owner: paths.Owner) -> None:
        from . import sidecar

        with self._step("egress sidecar (parallel)"):
            self.sidecar = sidecar.start(self._client, self.config, owner, self.volume)

    def _start_forwarder(self) -> None:
        ready = self._start_root_daemon(
            "egressproxy.py",
            {"listen": ["127.0.0.1", 0], "unix": f"{self._egress_dir}/egress.sock"},
            "forward",
        )
        self._forward_port = int(ready["port"])
        url = f"http://127.0.0.1:{self._forward_port}"
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            self._env[var] = url
        self._env["NO_PROXY"] = self._env["no_proxy"] = "127.0.0.1,localhost"

    # ---- code and state ------------------------------------------------------------

    def _upload_code(self) -> None:
        uid, gid = self.user["uid"], self.user["gid"]
        app = self.workdir.rsplit("/", 1)[1]
        # The engine extracts it (root here holds no CAP_DAC_OVERRIDE and the home may
        # be 0700); the tar's own entry for app/ makes the directory, owned by the user.
        if self.config.code_dir is not None:
            data = engine.tar_directory(self.config.code_dir, uid=uid, gid=gid, prefix=app)
        else:
            data = engine.tar_bytes([], uid=uid, gid=gid, dirs=[(app, 0o755)])
        if not self.container.put_archive(self.home, data):
            raise AgentboxError(f"could not create {self.workdir} in the sandbox")

    def _restore_state(self) -> None:
        from . import state

        store = self.config.state_store
        stored = store.load(self.config.state_scope)
        if stored is None:
            return
        limits = self.config.state_limits or state.Limits()
        with tempfile.TemporaryFile() as clean, open(stored, "rb") as src:
            # Cleaned again on the way in: the store is a file on disk that anything
            # with the user's rights could have replaced since it was written.
            report = state.clean_tar(src, clean, limits=limits, uid=self.user["uid"],
                                     gid=self.user["gid"])  # fmt: skip
            clean.seek(0)
            self.container.put_archive(self.home, clean)
        if report.dropped:
            self.warnings.append(f"state restore dropped: {report.summary()}")

    def _snapshot_state(self) -> None:
        from docker.errors import NotFound

        from . import state

        def sources() -> Iterator[Any]:
            # One archive at a time: the engine holds the container's lock while an
            # archive stream is open, so asking for the next one first would deadlock.
            for name in state.ALLOWED_DIRS:
                try:
                    stream, _ = self.container.get_archive(f"{self.home}/{name}")
                except NotFound:
                    continue
                yield stream

        limits = self.config.state_limits or state.Limits()
        report = self.config.state_store.save_from(
            self.config.state_scope, sources(), limits=limits,
            uid=self.user["uid"], gid=self.user["gid"],
        )  # fmt: skip
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

    def _user_env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        merged = dict(self._env)
        if env:
            merged.update(env)
        return merged

    def _user_command(
        self,
        command: str | Sequence[str],
        *,
        timeout: float | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
    ) -> tuple[str, list[str], dict[str, Any]]:
        """(display text, argv under the timeout runner, exec options) for a user command."""
        if isinstance(command, str):
            text, argv = command, ["/bin/sh", "-c", command]
        else:
            argv = [str(a) for a in command]
            text = shlex.join(argv)
        limit = self.config.timeout if timeout is None else timeout
        kwargs = {"user": self.user_spec, "env": self._user_env(env)}
        kwargs["workdir"] = cwd or self.workdir
        return text, ["python3", "-I", "-S", "-c", _RUNNER, str(limit), *argv], kwargs

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
        killed with its whole process group; the result then has ``timed_out`` set and
        exit code 124.
        """
        text, cmd, kwargs = self._user_command(command, timeout=timeout, env=env, cwd=cwd)
        start = time.monotonic()
        out = engine.exec_run(self._client, self.container.id, cmd, **kwargs)
        result = CommandResult(
            command=text,
            exit_code=out.exit_code,
            stdout=out.stdout.decode("utf-8", "replace"),
            stderr=out.stderr.decode("utf-8", "replace"),
            duration=time.monotonic() - start,
            timed_out=out.exit_code == 124 and b"agentbox: command timed out" in out.stderr,
        )
        self.history.append(result)
        return result

    def spawn(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> Spawned:
        """Start a long-running process that speaks newline-delimited JSON on stdin/stdout."""
        text, cmd, kwargs = self._user_command(command, timeout=timeout, env=env, cwd=cwd)
        exec_id, sock = engine.exec_start(self._client, self.container.id, cmd, **kwargs)
        return Spawned(self, text, exec_id, sock)

    def write_file(self, path: str, data: bytes | str) -> None:
        """Write ``data`` to ``path`` as the user (relative paths are under the code dir)."""
        raw = data.encode() if isinstance(data, str) else data
        out = engine.exec_run(
            self._client, self.container.id, ["/bin/sh", "-c", 'cat > "$1"', "sh", path],
            user=self.user_spec, stdin=raw, env=self._env, workdir=self.workdir,
        )  # fmt: skip
        if out.exit_code != 0:
            raise AgentboxError(f"write_file({path!r}) failed: {out.stderr.decode().strip()}")

    def read_file(self, path: str) -> bytes:
        """Read ``path`` as the user; raises FileNotFoundError or PermissionError like open()."""
        out = engine.exec_run(
            self._client, self.container.id, ["cat", "--", path],
            user=self.user_spec, env=self._env, workdir=self.workdir,
        )  # fmt: skip
        if out.exit_code != 0:
            msg = out.stderr.decode(errors="replace").strip()
            if "Permission denied" in msg:
                raise PermissionError(f"{path}: permission denied in the sandbox")
            raise FileNotFoundError(f"{path}: {msg or 'not readable'} in the sandbox")
        return out.stdout

    def upload(self, local_dir: str | Path, remote_dir: str) -> None:
        """Copy a host directory into ``remote_dir`` (created as the user; must be writable)."""
        target = remote_dir if remote_dir.startswith("/") else f"{self.workdir}/{remote_dir}"
        # The engine extracts as root, so first prove the user could write there itself.
        check = self.run(["/bin/sh", "-c", 'mkdir -p "$1" && test -w "$1"', "sh", target])
        if not check.ok:
            raise AgentboxError(f"upload: {target} is not writable by the sandbox user")
        data = engine.tar_directory(
            Path(local_dir), uid=self.user["uid"], gid=self.user["gid"], skip=set()
        )
        self.container.put_archive(target, data)

    def exec_hint(self) -> str:
        """The command that steps into this sandbox as the unprivileged user."""
        return f"docker exec -it -u {self.user_spec} -w {self.workdir} {self.container_id} /bin/sh"

    # ---- teardown ----------------------------------------------------------------

    def collect_logs(self) -> dict[str, str]:
        """The key proxy's request log and the egress decisions (never keys or tokens).

        Read fresh while the sandbox lives; once it is gone, the last copy read is kept.
        """
        logs = dict(self.logs)
        if self.container is not None and self.config.key_routes:
            with contextlib.suppress(Exception):
                logs["key proxy requests"] = self._root_exec(
                    ["cat", getattr(self, "_proxy_log", "/nonexistent")]
                ).stdout.decode(errors="replace")
        if self.sidecar is not None:
            from . import sidecar

            with contextlib.suppress(Exception):
                logs["egress decisions"] = sidecar.decisions(self._client, self.sidecar)
        self.logs = logs
        return logs

    def close(self, *, keep: bool = False) -> None:
        """Snapshot state and remove everything; ``keep`` leaves it running.

        Logs are not read here: only a failing test's report needs them, and it reads
        them before teardown (a passing test pays no extra round trips).
        """
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        store = self.config.state_store
        if self.container is not None and self.config.state_scope and store is not None:
            try:
                self._snapshot_state()
            except Exception as exc:  # the previous state stays intact
                errors.append(f"state snapshot failed, previous state kept: {exc}")
        if keep:
            return

        def remove(obj: Any) -> None:
            with contextlib.suppress(Exception):
                obj.remove(force=True, v=True)

        # Container and sidecar go side by side; the volume once both are gone.
        with ThreadPoolExecutor(max_workers=2) as pool:
            pool.map(remove, [o for o in (self.container, self.sidecar) if o is not None])
        if self.volume is not None:
            with contextlib.suppress(Exception):
                self.volume.remove(force=True)
        if self.container is not None:
            with _LIVE_LOCK:
                _LIVE.pop(self.container.id, None)
        self.warnings += errors

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        cid = self.container.short_id if self.container is not None else "-"
        return f"<Sandbox {cid} image={self.config.image!r}>"


class Spawned:
    """A long-running process in a sandbox, talking newline-delimited JSON."""

    def __init__(self, sandbox: Sandbox, command: str, exec_id: str, sock: Any) -> None:
        self.sandbox = sandbox
        self.command = command
        self._exec_id = exec_id
        self._sock = sock
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        try:
            for stream, data in engine._frames(self._sock):
                if stream == 2:
                    self._stderr.extend(data)
                    continue
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._lines.put(line.decode("utf-8", "replace"))
        except OSError:
            pass
        if buf:
            self._lines.put(buf.decode("utf-8", "replace"))
        self._lines.put(None)

    def send(self, message: str | Mapping[str, Any]) -> None:
        """Write one line (a dict is sent as JSON) to the process's stdin."""
        line = message if isinstance(message, str) else json.dumps(message)
        self._sock.sendall(line.encode() + b"\n")

    def readline(self, timeout: float = 30.0) -> str | None:
        """The next stdout line, or None at end of output; TimeoutError after ``timeout``."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output line within {timeout}s from: {self.command}") from None

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
        """Close stdin, wait for the process to end; returns its exit code."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(1)
        self._reader.join(timeout)
        with contextlib.suppress(OSError):
            self._sock.close()
        return engine.exec_exit_code(self.sandbox._client, self._exec_id)

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
