#!/bin/sh
# private_shm.sh PROG [ARGS...]: run PROG in a private mount namespace with a /dev/shm of its own
# (a fresh tmpfs), so that the shared-memory segments of other tests' processes are neither seen
# nor swept by it, and its own by none of them. Exit 77 (skipped) where unshare -m is not allowed
# (not root).
unshare -m true 2>/dev/null || { echo "skipped: unshare -m is not allowed here"; exit 77; }
exec unshare -m sh -c 'mount -t tmpfs -o size=16m tmpfs /dev/shm && exec "$@"' sh "$@"
