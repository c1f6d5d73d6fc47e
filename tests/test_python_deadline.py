#!/usr/bin/env python3
"""test_python_deadline.py: Python objects created with a timeout never hang (issue 19, class 2).

Run under mpirun at P = 3 (tests/python.cmake: test_python_deadline_np3, label python). In each
case rank 2 never makes the call; ranks 0 and 1 must get DistattnError "timeout" within the
timeout + the roll call's grace (min(timeout, 5 s)) + 3 s of slack, naming rank 2 where the
library can (the plan, the KV cache and the decode plan hold a roll call on their own duplicate;
Comm, whose only communicator is the caller's, says that a peer is missing without naming it:
docs/reliability.md). Every object gets its `timeout` argument (Comm: da_comm_create_config).

  DISTATTN_LIBRARY=build/lib/libdistattn.so PYTHONPATH=python \
    mpirun -x DISTATTN_LIBRARY -x PYTHONPATH -np 3 /usr/bin/python3 tests/test_python_deadline.py

It once died in 1 run of 8 after "# PASS", in the process teardown (glibc "free(): corrupted
unsorted chunks", exit 134): an MPI_Comm_idup left pending by a timed-out create made Open MPI's
MPI_Finalize release a half-built communicator twice (valgrind: invalid reads and writes in
ompi_comm_finalize). The bounded duplicate now starts the idup only after a barrier every rank
reached (comm/transport.c, da_mpi_comm_dup), so a timeout leaves only a pending barrier.
"""
import os
import sys
import time
import traceback

from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import distattn  # noqa: E402

T = 2.0
world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
failures = []


def case(name, make, want):
    """Every rank: a fresh duplicate of the world; ranks 0 and 1 call make(sub), rank 2 does not."""
    sub = world.Dup()
    if rank == 2:
        world.Barrier()
        return
    t0 = time.monotonic()
    try:
        obj = make(sub)
        failures.append(f"{name}: rank {rank}: returned {obj!r} although rank 2 never called it")
    except distattn.DistattnError as e:
        el = time.monotonic() - t0
        bound = T + min(T, 5.0) + 3.0
        if e.name != "timeout":
            failures.append(f"{name}: rank {rank}: status {e.name}, expected timeout: {e}")
        elif el > bound:
            failures.append(f"{name}: rank {rank}: raised after {el:.1f} s > {bound:.1f} s")
        elif want and want not in str(e):
            failures.append(f"{name}: rank {rank}: message does not say '{want}': {e}")
        else:
            print(f"ok  {name}: rank {rank}: timeout after {el:.1f} s: {e}", flush=True)
    except Exception:  # noqa: BLE001 - any other failure is reported, not hidden
        failures.append(f"{name}: rank {rank}: {traceback.format_exc()}")
    world.Barrier()  # the duplicate is left as it is: it holds a call that will never complete


def case_all_comm(name, fn, want):
    sub = world.Dup()
    c = distattn.Comm(sub)  # every rank
    if rank == 2:
        world.Barrier()
        return
    t0 = time.monotonic()
    try:
        obj = fn(c)
        failures.append(f"{name}: rank {rank}: returned {obj!r} although rank 2 never called it")
    except distattn.DistattnError as e:
        el = time.monotonic() - t0
        bound = T + min(T, 5.0) + 3.0
        if e.name != "timeout":
            failures.append(f"{name}: rank {rank}: status {e.name}, expected timeout: {e}")
        elif el > bound:
            failures.append(f"{name}: rank {rank}: raised after {el:.1f} s > {bound:.1f} s")
        elif want not in str(e):
            failures.append(f"{name}: rank {rank}: message does not say '{want}': {e}")
        else:
            print(f"ok  {name}: rank {rank}: timeout after {el:.1f} s: {e}", flush=True)
    except Exception:  # noqa: BLE001
        failures.append(f"{name}: rank {rank}: {traceback.format_exc()}")
    world.Barrier()


if size != 3:
    print("test_python_deadline: run at P = 3")
    sys.exit(1)
case("Comm(timeout=2)", lambda sub: distattn.Comm(sub, timeout=T), "did not complete within 2 s")
case_all_comm("Plan(timeout=2)",
              lambda c: distattn.Plan(c, seq=64, heads=2, dim=16, timeout=T), "rank 2 never reached da_plan_create")
case_all_comm("KVCache(timeout=2)",
              lambda c: distattn.KVCache(c, kv_heads=1, dim=16, timeout=T), "rank 2 never reached da_kvcache_create")
case_all_comm("DecodePlan(timeout=2)",
              lambda c: distattn.DecodePlan(c, heads=2, dim=16, timeout=T),
              "rank 2 never reached da_decode_plan_create")
nfail = world.allreduce(len(failures), op=MPI.SUM)
for f in failures:
    print("FAIL " + f, flush=True)
world.Barrier()
if rank == 0:
    print("# PASS" if nfail == 0 else f"# FAIL ({nfail})", flush=True)
sys.exit(1 if nfail else 0)
