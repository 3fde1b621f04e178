"""One launch at a time trains a run: the lease under the run's checkpoints prefix.

    checkpoints/<MODEL_NAME>/<DATASET_NAME>[/<RUN_NAME>]/lease.json
        {"holder": "<host> pid <pid>", "take": a random id of this take, "machine": "<host>
         <boot id>", "pid", "task": SKYPILOT_TASK_ID, "seconds": the holder's LEASE_SECONDS,
         "renewed": the bucket's time}

A launch's first training process (rank 0 under torchrun) takes the lease before it downloads
the model, with a conditional write (If-None-Match where there is none, If-Match the ETag of the
one it replaces), so that of two launches trying at once one wins; a second launch of the same
run (a repeated `sky jobs launch`) is refused in one line naming the holder. The holder renews
it every LEASE_SECONDS / 3 in a background thread and deletes it when it exits. A lease not
renewed for its holder's LEASE_SECONDS (recorded in it: the launches' settings may differ), by
the bucket's clock (common.Bucket.now: machines' own clocks may disagree), was left by a launch
that died (killed, preempted) and is taken over. Two are taken over at once: a recovery of the
same managed job (the same SKYPILOT_TASK_ID) takes its own back, and a lease whose process ran
on this machine (same host name and boot) and is gone (a run killed here, relaunched here) is
free. A holder whose lease was taken over (it could not renew it for LEASE_SECONDS) stops at
once.
"""

import atexit
import json
import os
import secrets
import socket
import sys
import threading
from datetime import datetime

from common import Conflict, UserError, log
from training.checkpoints import LEASE


class Lease:
    """This launch's lease on a run (take_lease)."""

    def __init__(self, bucket, prefix, task, seconds):
        self.bucket, self.key, self.task, self.seconds = bucket, f"{prefix}/{LEASE}", task, seconds
        self.holder = f"{socket.gethostname()} pid {os.getpid()}"
        self.take_id = secrets.token_hex(8)  # (a re-executed process takes again with its pid)
        self.etag, self.stopped, self.lock = None, threading.Event(), threading.Lock()

    def record(self):
        return json.dumps({"holder": self.holder, "take": self.take_id, "machine": this_machine(),
                           "pid": os.getpid(), "task": self.task, "seconds": self.seconds,
                           "renewed": self.bucket.now().isoformat()}).encode()

    def write(self, **condition):
        """Write this take's record on the condition: None when written, else the record another
        launch holds there instead ({}: none). The storage client sends a PUT again when its
        reply is lost; if the first attempt landed, the retry fails its condition and finds this
        take's own record there: written, with that record's ETag."""
        try:
            self.etag = self.bucket.put(self.key, self.record(), **condition)
            return None
        except (Conflict, FileNotFoundError):  # (S3 answers If-Match on no object with 404)
            data, etag = self.bucket.get_with_etag(self.key)
        held = json.loads(data) if data is not None else {}
        if held.get("take") != self.take_id:
            return held
        self.etag = etag
        return None

    def take(self):
        """Write the lease where there is none or over one that is free (stale, this job's own,
        or its process gone); else one line naming the holder."""
        data, etag = self.bucket.get_with_etag(self.key)
        if data is not None:
            held = json.loads(data)
            age = (self.bucket.now() - datetime.fromisoformat(held["renewed"])).total_seconds()
            seconds = held.get("seconds", self.seconds)  # the holder's, which it renews by
            why = ("this job's own" if self.task and held.get("task") == self.task else
                   "its process is gone" if ended(held) else
                   f"older than its LEASE_SECONDS={seconds}" if age >= seconds else None)
            if why is None:
                raise UserError(f"another launch is training this run: {self.bucket.url(self.key)} "
                                f"is held by {describe(held)}, renewed {age:.0f} s ago: let it "
                                "finish or cancel it (sky jobs cancel), or relaunch once it has "
                                f"not been renewed for its LEASE_SECONDS={seconds}")
            log(f"taking over {self.bucket.url(self.key)} from {describe(held)}, renewed "
                f"{age:.0f} s ago: {why}")
        if self.write(if_none_match=data is None, if_match=etag) is not None:
            raise UserError(f"another launch took {self.bucket.url(self.key)} at the same moment: "
                            "it trains this run")

    def renew(self):
        """Every LEASE_SECONDS / 3 until released: a failed write is tried again at the next
        renewal; a lease taken over stops this process."""
        while not self.stopped.wait(self.seconds / 3):
            with self.lock:
                if self.stopped.is_set():
                    return
                try:
                    held = self.write(if_match=self.etag)
                except Exception as e:  # noqa: BLE001 - the storage out of reach a while
                    log(f"could not renew {self.bucket.url(self.key)} ({type(e).__name__}): "
                        f"trying again in {self.seconds / 3:.0f} s")
                    continue
                if held is not None:
                    sys.stderr.write(f"error: {self.bucket.url(self.key)} was taken over by "
                                     f"{describe(held) if held else 'nobody (deleted)'}: another "
                                     "launch trains this run now, and this one stops\n")
                    os._exit(1)

    def release(self):
        """Delete the lease if it is still this launch's; after a failure it simply expires."""
        with self.lock:
            self.stopped.set()
            try:
                _, etag = self.bucket.get_with_etag(self.key)
                if etag and etag.strip('"') == str(self.etag).strip('"'):
                    self.bucket.fs.rm_file(self.bucket.path(self.key))
            except Exception as e:  # noqa: BLE001
                log(f"could not delete {self.bucket.url(self.key)} ({type(e).__name__}): it "
                    f"expires after LEASE_SECONDS={self.seconds}")


def this_machine():
    """This machine's host name and boot id (None where there is no /proc): a lease's process
    that ran on the same one can be looked up."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{socket.gethostname()} {f.read().strip()}"
    except OSError:
        return None


def ended(held):
    """Whether the lease's process is known to be gone: it ran on this machine and is no longer
    there (or is a zombie)."""
    if held.get("machine") is None or held.get("machine") != this_machine():
        return False
    try:
        with open(f"/proc/{held['pid']}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def describe(held):
    return held["holder"] + (f" (SKYPILOT_TASK_ID {held['task']})" if held.get("task") else "")


def take_lease(bucket, prefix, settings):
    """This launch's lease on the run whose checkpoints are under `prefix`, renewed in the
    background and released when the process exits (release() it before an exec)."""
    lease = Lease(bucket, prefix, settings.skypilot_task_id, settings.lease_seconds)
    lease.take()
    threading.Thread(target=lease.renew, daemon=True).start()
    atexit.register(lease.release)
    return lease
