"""mpi_runner.py: the runner that the Python test programs under mpirun share (test_python.py,
test_torch.py). Every test runs on every rank; a failure on any rank fails it on all; rank 0
prints one line per test (with its time) and "N passed, N failed"; the exit code is 1 on any
failure. Not a test framework: no discovery, no fixtures."""
import sys
import time
import traceback


class Skip(Exception):
    """A test that cannot run here raises this, saying why; counted apart from passes."""


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def run(tests, comm, only=(), footer=""):
    """Run tests (functions) in order, or only those named in `only`; returns the exit code.
    footer: a line rank 0 prints before the totals (what ran: ranks, library)."""
    rank = comm.Get_rank()
    passed = failed = skipped = 0
    for fn in tests:
        if only and fn.__name__ not in only:
            continue
        status, msg = "ok", ""
        t0 = time.perf_counter()
        try:
            fn()
        except Skip as e:
            status, msg = "skip", str(e)
        except Exception as e:  # noqa: BLE001 (any failure of any rank fails the test)
            status, msg = "FAIL", "".join(traceback.format_exception_only(type(e), e)).strip()
            if not isinstance(e, AssertionError):
                msg += "\n" + traceback.format_exc()
        statuses = comm.allgather((status, msg))
        bad = [(r, m) for r, (s, m) in enumerate(statuses) if s == "FAIL"]
        if bad:
            failed += 1
        elif status == "skip":
            skipped += 1
        else:
            passed += 1
        if rank == 0:
            word = "FAIL" if bad else status
            print(f"{word:4s} {fn.__name__} {time.perf_counter() - t0:.1f} s" +
                  (f" ({msg})" if status == "skip" and not bad else ""))
            for r, m in bad:
                print(f"     rank {r}: {m}")
            sys.stdout.flush()
    if rank == 0:
        if footer:
            print(footer)
        print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0
