"""`python -m distres.launch`: torchrun that exits with the workers' own exit code.

    python -m distres.launch --nproc_per_node=8 -- --config configs/resnet50_imagenet.yaml
    python -m distres.launch --nproc_per_node=8 -m distres.evaluate --checkpoint runs/r50/...

Arguments before `--` are torchrun's (`--standalone` is added when no rendezvous is given),
those after it go to `distres.train`; without `--` the arguments are torchrun's command line
as they are. torchrun itself turns any worker failure into exit code 1 and prints its
ChildFailedError block; here the workers' code comes back (3 preempted, 4 non-finite loss,
2 config or data, 5 checkpoint, 1 failed), with one line saying which rank gave it and no
foreign traceback. The workers' own messages are above it, as they printed them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from distres import errors

TRAIN = ["-m", "distres.train"]
RENDEZVOUS = (
    "--standalone",
    "--rdzv_endpoint",
    "--rdzv-endpoint",
    "--master_addr",
    "--master-addr",
    "--nnodes",
)


def torchrun_args(argv: list[str]) -> list[str]:
    """torchrun's command line for ours (see the module doc)."""
    if "--" not in argv:
        return argv
    cut = argv.index("--")
    launcher, train = argv[:cut], argv[cut + 1 :]
    if not any(a.split("=", 1)[0] in RENDEZVOUS for a in launcher):
        launcher = ["--standalone", *launcher]
    return [*launcher, *TRAIN, *train]


def exit_code(failures: dict) -> tuple[int, int]:
    """(code, rank): the first failing worker's exit code when it exited by itself, else the
    code any worker exited with (others may have been stopped by a signal after it)."""
    ordered = sorted(failures.items(), key=lambda item: item[1].timestamp)
    for rank, failure in ordered:
        if failure.exitcode > 0:
            return failure.exitcode, rank
    rank, failure = ordered[0]
    return 128 + abs(failure.exitcode), rank  # killed by a signal: the shell's convention


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    from distres.cli import rendezvous

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["store"]:
        return rendezvous.serve(argv[1:])
    # torch (>= 2.4) hands the workers the rank-0 agent's own store and caches its address
    # across rendezvous rounds (elastic/rendezvous/dynamic_rendezvous.py, the shared-store
    # branch): a node that joins later waits for an address the old rank 0 never publishes
    # again while that one waits for the newcomer's role info, and both time out (pytorch
    # #147064); a newcomer that becomes rank 0 points its workers at another store. torch's
    # own opt-out publishes the address every round, with a fresh store hosted by worker
    # rank 0 each time (torchrun's behaviour up to 2.3).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    command = torchrun_args(argv)
    args = parse_args(command)
    if args.rdzv_backend == "c10d" and (where := rendezvous.endpoint(command)):
        rendezvous.watch(*where)
    # torchrun's own error report (a block per failed worker) repeats what the workers said;
    # its warnings about stopping the other workers stay.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        code, rank = exit_code(e.failures)
        print(f"[distres.launch] rank {rank} exited with code {code}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except RendezvousError as e:
        # the store went away (or a closed rendezvous id): one line, not the agent's trace
        print(f"[distres.launch] rendezvous failed: {type(e).__name__}: {e}", file=sys.stderr)
        return errors.FAILED
    except SignalException as e:
        # The agent got a signal (Ctrl-C, a scheduler's SIGTERM/SIGUSR1) and passed it to the
        # workers, which stop at a step boundary with a checkpoint; an agent that is shutting
        # down does not collect their codes, so the signal's own meaning is the exit code.
        name = signal.Signals(e.sigval).name
        print(f"[distres.launch] stopped by {name}: the workers were told to stop at the next "
              "step with a checkpoint (torch's agent gives them 30 s)",
              file=sys.stderr)  # fmt: skip
        return errors.INTERRUPTED if e.sigval == signal.SIGINT else errors.PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
