"""The rules that let a sandbox run under gVisor: the host's judgement as pure logic, the
root step's closing of a writable root on a real container (gVisor boxes: test_runsc.py).

gVisor refuses the read-only remount of ``/``; the one writable root the hardening
accepts is gVisor's in-memory overlay, closed to the agent, and only when the engine's
own runtime list and the box both say so. No sandbox gets that far under Debian's runsc
(2022-12): it has no child subreaper, and the root step stops before anything else.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pytest_agentbox.backends import tools
from pytest_agentbox.backends.docker import engine
from pytest_agentbox.errors import HardeningError
from pytest_agentbox.inside import hardening

USER = {"name": "agent", "uid": 1000, "gid": 1000, "home": "/home/agent"}


def _report(**storage: Any) -> dict[str, Any]:
    """A root step's report from gVisor with an in-memory root closed to the agent."""
    base = {"home": "/home/agent", "root_readonly": False, "root_readonly_error": "refused",
            "root_fs": "overlay", "root_agent_writable": []}  # fmt: skip
    return {"user": USER, "runner_python": "/usr/bin/python3.11", "hidepid": False,
            "gvisor": True, "subreaper": True, "storage": {**base, **storage}}  # fmt: skip


def test_a_writable_root_passes_only_as_gvisors_memory_root_closed_to_the_agent() -> None:
    warned = hardening.check(_report(), keys_in_use=False, gvisor=True, root_in_memory=True)
    assert any("hidepid=2" in w for w in warned)  # keyless: a warning, as under runc
    # The engine's runtime does not keep the root in memory (e.g. a directory medium).
    with pytest.raises(HardeningError, match=r"could not be made read-only.*overlay2=root:memory"):
        hardening.check(_report(), keys_in_use=False, gvisor=True, root_in_memory=False)
    # The root is not the overlay (runsc without --overlay2 serves / from the host).
    with pytest.raises(HardeningError, match="could not be made read-only"):
        hardening.check(_report(root_fs="9p"), keys_in_use=False, gvisor=True, root_in_memory=True)
    # The agent could still write somewhere on it.
    with pytest.raises(HardeningError, match="sandbox user could write there: /opt/app"):
        hardening.check(
            _report(root_agent_writable=["/opt/app"]),
            keys_in_use=False, gvisor=True, root_in_memory=True,
        )  # fmt: skip
    # The closing step did not run (no report of it): never assumed closed.
    report = _report()
    del report["storage"]["root_agent_writable"]
    with pytest.raises(HardeningError, match="could not be made read-only"):
        hardening.check(report, keys_in_use=False, gvisor=True, root_in_memory=True)


def test_a_box_claiming_gvisor_where_the_engine_runs_runc_fails_closed() -> None:
    with pytest.raises(HardeningError, match="fakes it"):
        hardening.check(_report(), keys_in_use=False, gvisor=False, root_in_memory=True)


def test_keys_under_gvisor_fail_closed_with_the_reason() -> None:
    with pytest.raises(HardeningError, match=r"hidepid=2.*gVisor's /proc has no hidepid"):
        hardening.check(_report(), keys_in_use=True, gvisor=True, root_in_memory=True)


def test_a_kernel_without_a_child_subreaper_fails_closed() -> None:
    # gVisor answers PR_SET_CHILD_SUBREAPER with EINVAL: a timed-out command's setsid
    # grandchildren would go to init, where no runner can end them.
    report = {**_report(), "subreaper": False, "subreaper_error": "Invalid argument"}
    with pytest.raises(HardeningError, match=r"SUBREAPER \(Invalid argument\).*gVisor"):
        hardening.check(report, keys_in_use=False, gvisor=True, root_in_memory=True)
    del report["subreaper"]  # never reported: never assumed
    with pytest.raises(HardeningError, match="SUBREAPER"):
        hardening.check(report, keys_in_use=False, gvisor=True, root_in_memory=True)


@pytest.mark.parametrize(
    ("args", "in_memory"),
    [
        (["--network=none", "--overlay2=root:memory"], True),
        (["--overlay2", "all:memory"], True),
        (["--overlay"], True),
        (["--overlay2=root:/var/lib/runsc"], False),  # a file store on the host's disk
        (["--overlay2=root:memory", "--overlay2=none"], False),  # the last one wins
        (["--overlay=false"], False),
        ([], False),
    ],
)
def test_which_runtimes_keep_the_root_in_memory(args: list[str], in_memory: bool) -> None:
    other = {"path": "/usr/bin/crun", "runtimeArgs": ["--overlay2=root:memory"]}
    gvisor = {"path": "/usr/bin/runsc", "runtimeArgs": args}
    info = {"Runtimes": {"runc": {"path": "runc"}, "g": gvisor, "other": other}}
    assert engine.gvisor_runtimes(info) == ("g",)
    assert engine.memory_root_runtimes(info) == (("g",) if in_memory else ())


def test_the_root_step_closes_a_writable_root_and_names_what_the_agent_owns_there(
    docker_client: Any, base_image: str
) -> None:
    # On a real container whose root stays writable (no SYS_ADMIN for the remount): the
    # world-writable places lose that bit, what the agent's uid owns is reported (the
    # host then refuses the sandbox), the home and /tmp are left alone.
    source = tools.tool_source("hardening.py").decode()
    driver = (
        f"ns = {{'__name__': 'hardening'}}\nexec({source!r}, ns)\nimport json\n"
        "out = ns['_read_only_root']()\n"
        "user, skip = {'uid': 1000, 'gid': 1000}, ['/home/agent', '/tmp']\n"
        "out.update(ns['_close_root_writes'](user, skip))\n"
        "print(json.dumps(out))"
    )
    prepare = (
        "mkdir -m 1777 /opt/shared && mkdir -p /opt/mine /home/agent && chown 1000 /opt/mine "
        '/home/agent && chmod 0777 /home/agent && exec python3 -c "$0"'
    )
    out = docker_client.containers.run(
        base_image, ["sh", "-c", prepare, driver], remove=True, network_mode="none",
        cap_drop=["ALL"], cap_add=["CHOWN", "FOWNER"], labels={"agentbox.test": "gvisor-rules"},
    )  # fmt: skip
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["root_readonly"] is False and report["root_fs"] == "overlay", report
    assert {"/opt/shared", "/var/tmp"} <= set(report["root_closed"]), report
    assert report["root_agent_writable"] == ["/opt/mine"], report
    assert not any(p.startswith(("/home/agent", "/tmp/")) for p in report["root_closed"]), report
