"""ACK control IDs (MSH-10) are unique across processes, not only within one: two hubs started
in the same second (scaled out on one store, or a restart within it) must not issue the same
IDs, nor a process forked from one. Real processes: two fresh imports started together, timed
to fall in the same second, and a fork. Each ID still fits MSH-10's 20 characters."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

IDS_PER_PROCESS = 500
#: MSH-10's length before v2.7.
CONTROL_ID_LENGTH = 20

#: Imports the ACK module at the start of the given second, then prints IDs, one a line.
CHILD = textwrap.dedent(
    """
    import sys, time
    import carehub.hl7.view  # what the ACK module needs, loaded before the second starts
    start = float(sys.argv[1])
    time.sleep(max(0.0, start - time.time()))
    from carehub.hl7.ack import new_control_id
    print("\\n".join(new_control_id() for _ in range(int(sys.argv[2]))))
    """
)


def test_two_processes_started_in_the_same_second_issue_different_ids() -> None:
    start = int(time.time()) + 2 + 0.05  # just after a whole second, far enough for both
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(start), str(IDS_PER_PROCESS)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=60)[0].split() for child in children]
    assert [child.returncode for child in children] == [0, 0]
    first, second = (set(ids) for ids in outputs)
    assert len(first) == len(second) == IDS_PER_PROCESS
    assert not first & second
    assert max(len(i) for ids in outputs for i in ids) <= CONTROL_ID_LENGTH


#: Forks, and prints the IDs the child and then the parent issue after the fork, one a line.
FORKING = textwrap.dedent(
    """
    import os, sys
    from carehub.hl7.ack import new_control_id
    count = int(sys.argv[1])
    new_control_id()
    pid = os.fork()
    if pid == 0:
        print("\\n".join(new_control_id() for _ in range(count)), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    print("\\n".join(new_control_id() for _ in range(count)), flush=True)
    """
)


def test_a_forked_process_issues_ids_of_its_own() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORKING, str(IDS_PER_PROCESS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    child, parent = set(ids[:IDS_PER_PROCESS]), set(ids[IDS_PER_PROCESS:])
    assert len(child) == len(parent) == IDS_PER_PROCESS
    assert not child & parent
