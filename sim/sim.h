/* sim.h: the SimGrid SMPI build of the drivers (sim/Makefile). The kernel table is replaced by
 * the `sim` backend, whose calls only advance the simulated clock (smpi_execute) by the time the
 * work would take at calibrated rates; payload buffers alias one untouched arena (sim_alloc.c). Nothing here is
 * compiled into the normal build. */
#ifndef DA_SIM_H
#define DA_SIM_H

#include <stdint.h>

/* Rates of the simulated device (one per rank). Times: fwd_block = call_s + 4*H*D*pairs / fwd_flops,
 * bwd_block = call_s + 10*H*D*pairs / bwd_flops, memory-bound calls (finish, bwd_prep, decode's
 * KV read) = call_s + bytes / mem_bps. */
typedef struct da_sim_calib {
  const char *name;
  double fwd_flops, bwd_flops; /* FLOP/s of the attention kernels (useful work, FA convention) */
  double mem_bps;              /* bytes/s for memory-bound calls */
  double call_s;               /* fixed cost per kernel call (launch, packing) */
} da_sim_calib_t;

/* Set once by the program before any plan is made (ranks share it: privatization is off). */
extern da_sim_calib_t da_sim_calib;
/* Simulated seconds the sim kernels have injected on this process (all ranks together). */
extern double da_sim_kernel_s;

/* The drivers' host payload work outside the kernel table (comm/ring.c: packing the KV block,
 * clearing and summing fp32 dK/dV, storing gradients): charged to the simulated clock as `bytes`
 * of memory traffic at mem_bps, never done (the buffers hold no data). The comm/ objects are
 * compiled with this header forced in (sim/Makefile). */
int da_sim_payload(double bytes);

/* The drivers' clock (core.h's da_time_now) in the comm/ objects: the simulated time, read
 * directly. SMPI's clock_gettime would stop and restart its compute-burst timer (two CPU-clock
 * system calls) at each of the ring's five reads per step, a fifth of the host time of a point,
 * for nothing: simulate-computation is off. */
double da_sim_time_now(void);
#define da_time_now da_sim_time_now

/* Host copies of comm/ulysses.c (compiled with -Dmemcpy=da_sim_memcpy, sim/Makefile): a copy into
 * payload memory is charged as 2 x n bytes of memory traffic (read + write), never done; others
 * are copied. The charge waits in da_sim_pending_bytes until the next kernel call or clock read. */
void *da_sim_memcpy(void *dst, const void *src, size_t n);
extern double da_sim_pending_bytes;

/* Drop the bytes of messages sent from payload buffers (sim_alloc.c); call after MPI_Init. */
void da_sim_copy_hook_install(void);
#define da_payload(bytes) da_sim_payload(bytes)

#endif
