"""Multi-process runs: the coordinator settings (arguments or environment), checked, handed to
``jax.distributed.initialize``; the barrier and the primary-process test the trainers share.

Settings come as a whole (coordinator address, process count and this process's id) or not at
all; with none, ``initialize(auto=True)`` lets JAX detect the cluster (SLURM, Open MPI,
Kubernetes, Cloud TPU). A single-process run needs neither.
"""

import dataclasses
import os
import re
import sys
import threading

import jax

from safetriage_jax.errors import SafeTriageError

ENVIRONMENT = {"coordinator_address": "SAFETRIAGE_COORDINATOR_ADDRESS",
               "num_processes": "SAFETRIAGE_NUM_PROCESSES",
               "process_id": "SAFETRIAGE_PROCESS_ID"}
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where the coordinator listens (``HOST:PORT``, served by process 0), how many processes
    take part and which one this is; all None: detect the cluster or run alone."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


def launch_settings(coordinator_address=None, num_processes=None, process_id=None,
                    environ=None) -> Launch:
    """The settings given (integers or their text), each falling back to its ``SAFETRIAGE_*``
    environment variable; raises :class:`SafeTriageError` naming what is malformed or missing."""
    environ = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    values = {}
    for name, value in given.items():
        if value is None and environ.get(ENVIRONMENT[name], "") != "":
            value = environ[ENVIRONMENT[name]]
        values[name] = value
    for name in ("num_processes", "process_id"):
        if isinstance(values[name], str):
            try:
                values[name] = int(values[name])
            except ValueError:
                raise SafeTriageError(f"The {_words(name)} must be an integer, not "
                                      f"{values[name]!r}.") from None
    launch = Launch(**values)
    validate(launch)
    return launch


def validate(launch: Launch):
    """All three settings or none; ``HOST:PORT`` with a port in 1..65535; ``0 <= id < count``."""
    if not launch.explicit:
        return
    missing = [_words(k) for k, v in dataclasses.asdict(launch).items() if v is None]
    if missing:
        raise SafeTriageError(f"A multi-process launch needs the coordinator address, the number "
                              f"of processes and the process id together; missing: "
                              f"{', '.join(missing)} (or set {', '.join(ENVIRONMENT.values())}).")
    match = _HOST_PORT.match(launch.coordinator_address)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise SafeTriageError(f"The coordinator address {launch.coordinator_address!r} is not "
                              "HOST:PORT with a port in 1..65535 (e.g. 10.0.0.1:12345).")
    if launch.num_processes < 1:
        raise SafeTriageError(f"The number of processes must be at least 1, not "
                              f"{launch.num_processes}.")
    if not 0 <= launch.process_id < launch.num_processes:
        raise SafeTriageError(f"The process id {launch.process_id} must be in 0..."
                              f"{launch.num_processes - 1} for {launch.num_processes} processes.")


def _words(name):
    return {"coordinator_address": "coordinator address", "num_processes": "number of processes",
            "process_id": "process id"}[name]


DEFAULT_TIMEOUT_S = 300  # how long to wait for the coordinator and every process to join


def initialize(launch: Launch = Launch(), *, auto=False, timeout_s=DEFAULT_TIMEOUT_S) -> bool:
    """Joins the multi-process run described by ``launch`` (or, with ``auto`` and no settings,
    the detected cluster); CPU collectives go over gloo. Returns whether it initialized.

    When the coordinator cannot be reached or a process does not join within ``timeout_s``,
    JAX would abort the process from C++ with a stack dump; a watchdog instead prints one
    ``error:`` line naming the address and ends the process (exit code 2) just before."""
    if not launch.explicit and not auto:
        return False
    if not 1 <= timeout_s <= 24 * 3600:
        raise SafeTriageError(f"The coordinator timeout must be from 1 s to 24 h (got {timeout_s}).")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = launch.coordinator_address or "the detected cluster's coordinator"
    watchdog = threading.Timer(timeout_s, _give_up, args=(where, timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**dataclasses.asdict(launch),
                                   initialization_timeout=int(timeout_s) + 60)
    except (ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        hint = ("" if launch.explicit else "; outside SLURM, Open MPI, Kubernetes or Cloud TPU, "
                "give the coordinator address, the number of processes and the process id")
        raise SafeTriageError(f"Could not start the multi-process run ({reason}){hint}.") from None
    finally:
        watchdog.cancel()
    return True


def _give_up(where, timeout_s):
    """The watchdog's end: JAX's own timeout would abort with a C++ stack dump."""
    sys.stderr.write(f"error: No multi-process run could be joined at {where} within "
                     f"{timeout_s:g} s: the coordinator (process 0) is unreachable there or not "
                     "every process started. Check the address and start every process, or "
                     "raise --coordinator-timeout.\n")
    sys.stderr.flush()
    os._exit(2)


def is_primary() -> bool:
    """Process 0 writes logs, samples, configs and the final model."""
    return jax.process_index() == 0


def barrier(name: str):
    """Waits until every process reaches the barrier ``name`` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def primary_first(make, name):
    """``make()`` on process 0, then (after the barrier ``name``) on the others: for work that
    fills a shared folder once, e.g. preparing a dataset the others then only open."""
    if not is_primary():
        barrier(name)
        return make()
    try:
        return make()
    finally:  # on failure too: the others then meet the same error instead of waiting
        barrier(name)
