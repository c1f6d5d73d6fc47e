# fault.cmake: fault injection at P = 4 (label fault, issue 10): one rank of `distattn run` and of
# `distattn decode` is killed (SIGKILL) or stopped (SIGSTOP) mid-loop; the job must end non-zero
# within --timeout (5 s) + 10 s with stderr naming that rank (tests/fault_test.sh). The same for a
# memory rank of an offloaded decode (issue 5: 2 compute + 3 memory ranks, MPMD; the victim is
# rank 3, a memory rank of group 0 beside another one), where the stop test also checks what
# every surviving rank says. Part of the default `make test`; about 75 s in all.
find_program(DA_FAULT_MPIRUN NAMES mpirun.openmpi mpirun)
if(NOT TARGET distattn OR NOT TARGET da_comm OR NOT DA_FAULT_MPIRUN)
  return()
endif()
foreach(cmd run decode)
  foreach(sig kill stop)
    add_test(NAME fault_${cmd}_${sig}_np4
             COMMAND timeout -k 5 50 ${CMAKE_CURRENT_SOURCE_DIR}/fault_test.sh $<TARGET_FILE:distattn>
                     ${DA_FAULT_MPIRUN} ${cmd} ${sig} 2)
    set_tests_properties(fault_${cmd}_${sig}_np4 PROPERTIES LABELS fault TIMEOUT 60)
  endforeach()
endforeach()
foreach(sig kill stop)
  add_test(NAME fault_offload_${sig}_2c3m
           COMMAND timeout -k 5 50 ${CMAKE_CURRENT_SOURCE_DIR}/fault_test.sh $<TARGET_FILE:distattn>
                   ${DA_FAULT_MPIRUN} offload ${sig} 3)
  set_tests_properties(fault_offload_${sig}_2c3m PROPERTIES LABELS fault TIMEOUT 60)
endforeach()

# The fault matrix (issue 19, tests/fault_matrix.sh): {SIGSTOP, SIGKILL} x {the phases} x {run,
# decode, offload}, rank 1 of 3 faulting at a hook point (DISTATTN_TEST_FAULT); every cell must end
# within --timeout (3 s) + 10 s, non-zero, naming rank 1. The list is generated from the points
# each command has; the cells left out are the ones that do not exist or are the same as one kept:
#   decode: no backward, no --input / --output; offload: neither, and no placement phase (its
#   threads come from --threads, default 1); "step" (the fault 1.5 s into a forward whose
#   compute steps are tens of seconds) for run only: a decode or offload step lasts milliseconds,
#   so for them it is the forward cell (the watchdog that ends a stopped job does not depend on
#   the command). SIGKILL: Open MPI notices the exit and ends the job whatever the other ranks
#   are doing, the same in every phase, so kill cells are kept for setup and the forward of each
#   command, and for run also inside a long step and inside MPI-IO (the cases most unlike the rest).
# One ctest per command, 3 cells at a time: about 20-60 s each on 2 cores.
set(da_fm_stop_run setup place plan forward step backward verify input output)
set(da_fm_stop_decode setup place plan forward verify)
set(da_fm_stop_offload setup plan forward verify)
set(da_fm_kill_run setup forward step output)
set(da_fm_kill_decode setup forward)
set(da_fm_kill_offload setup forward)
foreach(cmd run decode offload)
  set(cells)
  foreach(sig stop kill)
    foreach(point ${da_fm_${sig}_${cmd}})
      list(APPEND cells ${cmd}:${sig}:${point})
    endforeach()
  endforeach()
  add_test(NAME fault_matrix_${cmd}
           COMMAND timeout -k 5 230 ${CMAKE_CURRENT_SOURCE_DIR}/fault_matrix.sh $<TARGET_FILE:distattn>
                   ${DA_FAULT_MPIRUN} 3 ${cells})
  set_tests_properties(fault_matrix_${cmd} PROPERTIES LABELS fault TIMEOUT 240)
endforeach()

# A problem that does not fit is refused by da_plan_create before anything large is allocated,
# naming the bytes per rank and the budget (MemAvailable / ranks on the machine, or
# DISTATTN_MEM_BUDGET): exit 2 on every rank.
if(COMMAND da_run_cli)
  da_run_cli(cli_run_does_not_fit 2 2 ERR_RE "needs [0-9.]+ GiB on this rank .plan buffers [0-9.]+ GiB . inputs and outputs [0-9.]+ GiB., over its budget of [0-9.]+ GiB .MemAvailable [0-9.]+ GiB / 2 ranks on this machine"
             ARGS --seq 64M --heads 64 --dim 128 --verify 0)
  # The same check with the budget from the environment, at P = 3 with the backward counted.
  da_run_cli(cli_run_over_env_budget 3 2 ENV DISTATTN_MEM_BUDGET=1M
             ERR_RE "rank [0-9]: the problem needs [0-9.]+ MiB on this rank .plan buffers [0-9.]+ MiB . inputs and outputs [0-9.]+ MiB., over its budget of 1.00 MiB .DISTATTN_MEM_BUDGET=1M."
             ARGS --seq 4K --heads 4 --dim 64 --verify 0 --backward)
  da_run_cli(cli_run_bad_env_budget 2 2 ENV DISTATTN_MEM_BUDGET=lots ERR_RE "DISTATTN_MEM_BUDGET=lots: expected a size"
             ARGS --seq 4K --heads 4 --dim 64 --verify 0)
endif()

# A rank whose allocation fails says so and every rank stops with it (issue 19), rather than one
# rank going silent while the others wait in a collective: the backward check's row tables
# failing on rank 1 (test hook DISTATTN_TEST_FAIL_ALLOC; before, the ranks disagreed: rc -1 was
# reduced with MAX against 0), and a KV-cache page of 1G rows (2 TiB) that rank 0 cannot
# allocate in the decode loop (before: the others waited in the step until the deadline). The
# ranks' stderr lines reach mpirun in no set order, so each pattern takes both orders.
if(COMMAND da_run_cli)
  da_run_cli(cli_run_fail_alloc_row_stats 3 1 ENV DISTATTN_TEST_FAIL_ALLOC=1:row_stats
             ERR_RE "(rank 1: out of memory for the backward check's row statistics .*rank [02]: verification ran out of memory|rank [02]: verification ran out of memory.*rank 1: out of memory for the backward check's row statistics )"
             ARGS --seq 1K --heads 4 --dim 32 --backward --verify 4 --timeout 20)
endif()
if(COMMAND da_decode_cli)
  da_decode_cli(cli_decode_page_oom 2 2
                ERR_RE "(rank 0: kv cache append: out of memory: rank 0: kv cache page of 1073741824 rows.*rank 1: kv cache append: rank 0 failed .out of memory.: stopping|rank 1: kv cache append: rank 0 failed .out of memory.: stopping.*rank 0: kv cache append: out of memory: rank 0: kv cache page)"
                ARGS --context 4K --heads 4 --dim 64 --page 1G --steps 2 --timeout 20)
endif()

# An interrupted sweep (slurm/sweep.sbatch under bash with mpirun: SIGTERM, then SIGKILL of the job
# and its step) resumes without duplicates; JSON records are appended whole or not at all
# (tests/sweep_resume_test.sh, about 15 s).
add_test(NAME sweep_resume
         COMMAND timeout -k 5 170 ${CMAKE_CURRENT_SOURCE_DIR}/sweep_resume_test.sh $<TARGET_FILE:distattn>
                 ${PROJECT_SOURCE_DIR})
set_tests_properties(sweep_resume PROPERTIES LABELS fault TIMEOUT 180 SKIP_RETURN_CODE 77)
