"""An elastic job's rendezvous store outside every agent, and an agent's watch on it.

torchrun's c10d rendezvous keeps its store in the agent that started first: when that agent
dies, the job dies with it (pytorch #67742, #118891). `python -m distres.launch store` runs
the store as a process of its own (a TCPStore server, what torchrun's agents connect to with
`--rdzv-conf=is_host=false`), on a host that stays up: the login node, the Kubernetes
service, the Slurm batch host.

torch's agent does not notice a store that went away while its workers run: they train on
until the next rendezvous, which then waits out its timeouts. `watch` probes the store every
few seconds from the agent's process and, when it stops answering, stops the workers (their
whole process trees: torchrun starts each in a session of its own) and ends the agent with
one line and exit code 1, so a scheduler sees the job end within seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import sys
import threading
import time

PROBE_EVERY_S = 2.0
ANSWER_WITHIN_S = 10.0
KEY = "distres/watch"


def serve(argv: list[str]) -> int:
    """`python -m distres.launch store [--host H] [--port P]`: serve until SIGTERM/Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m distres.launch store",
        description="The rendezvous store of an elastic job, outside every agent (docs/elastic.md)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=29400, help="port (0: any free one)")
    args = parser.parse_args(argv)
    from torch.distributed import TCPStore

    try:
        store = TCPStore(args.host, args.port, is_master=True, wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        print(f"[distres.launch] store: cannot listen on {args.host}:{args.port} ({e})",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"[distres.launch] rendezvous store listening on {args.host}:{store.port}; agents "
          f"take --rdzv_backend=c10d --rdzv_endpoint=<this host>:{store.port} "
          "--rdzv-conf=is_host=false", flush=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    del store
    return 0


def endpoint(argv: list[str]) -> tuple[str, int] | None:
    """The c10d rendezvous endpoint of a torchrun command line (None: standalone or none)."""
    if "--standalone" in argv:
        return None
    for k, a in enumerate(argv):
        for flag in ("--rdzv_endpoint", "--rdzv-endpoint"):
            value = a.split("=", 1)[1] if a.startswith(flag + "=") else None
            if a == flag and k + 1 < len(argv):
                value = argv[k + 1]
            if value:
                host, _, port = value.rpartition(":")
                return (host or value, int(port or 29400))
    return None


def watch(host: str, port: int, exit_code: int = 1) -> None:
    """Probe the store from a daemon thread (see the module doc); the first probe waits for
    the store to come up, as the agent's rendezvous does."""

    def run() -> None:
        from torch.distributed import TCPStore

        try:
            client = TCPStore(host, port, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=ANSWER_WITHIN_S))  # fmt: skip
        except Exception:
            return  # never reached: the agent's own rendezvous says so
        while True:
            time.sleep(PROBE_EVERY_S)
            answer: list = []
            probe = threading.Thread(target=_probe, args=(client, answer), daemon=True)
            probe.start()
            probe.join(ANSWER_WITHIN_S + 1)
            if not answer or answer[0] is not None:
                why = f"{type(answer[0]).__name__}" if answer else "no answer"
                lost(f"{host}:{port} ({why} within {ANSWER_WITHIN_S:.0f} s)", exit_code)

    threading.Thread(target=run, name="distres-store-watch", daemon=True).start()


def _probe(client, answer: list) -> None:
    try:
        client.check([KEY])
        answer.append(None)
    except Exception as e:  # reset or refused: the store's process is gone
        answer.append(e)


def lost(where: str, exit_code: int, grace_s: float = 30.0) -> None:
    print(f"[distres.launch] the rendezvous store {where} is gone: stopping the workers "
          "(they resume from the last checkpoint when the job is started again)",
          file=sys.stderr, flush=True)  # fmt: skip
    workers = _children(os.getpid())
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in workers:
            with contextlib.suppress(OSError):  # a worker leads its own session (and its
                os.killpg(pid, sig)  # loader's workers): the whole tree
        end = time.monotonic() + wait
        while time.monotonic() < end and any(_alive(p) for p in workers):
            time.sleep(0.1)
    os._exit(exit_code)  # the agent's main thread may be blocked in the store itself


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
