/* test_ring_helpers.h: test_ring.c with its main left out, for the driver suites that reuse its
 * case runner, float64 reference, 1-rank comparison and zplan helpers (test_ulysses, test_hybrid),
 * so every driver is held to the same checks and tolerances. Not a header of declarations: it
 * compiles test_ring.c into the including suite, where what the suite does not call is unused
 * by design, hence the silenced warnings. */
#ifndef DA_TEST_RING_HELPERS_H
#define DA_TEST_RING_HELPERS_H

#define DA_TEST_RING_HELPERS_ONLY
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-variable"
#pragma GCC diagnostic ignored "-Wunused-const-variable"
#include "test_ring.c"
#pragma GCC diagnostic pop

#endif /* DA_TEST_RING_HELPERS_H */
