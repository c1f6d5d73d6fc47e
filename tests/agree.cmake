# agree.cmake: ranks given different command lines (issue 19, class 4; tests/agree_test.sh).
# agree_sweep_*: for every option of the command's table (and --help), one rank gets another valid
# value and the real agreement must refuse it naming the option (per-rank options: accept it); the
# table is read by the binary itself, so a new option is covered without touching this file. In
# process (one 2-rank launch per command, under a second each). agree_mpmd_*: real MPMD launches
# (another command, --iters, --help on one rank, the offload's roles with other --steps): exit 2
# and the message on every rank. Label mpi.
find_program(DA_AGREE_MPIRUN NAMES mpirun.openmpi mpirun)
if(NOT TARGET distattn OR NOT TARGET da_comm OR NOT DA_AGREE_MPIRUN)
  return()
endif()
foreach(cmd run decode offload)
  add_test(NAME agree_sweep_${cmd}
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/agree_test.sh $<TARGET_FILE:distattn> ${DA_AGREE_MPIRUN} sweep ${cmd})
  set_tests_properties(agree_sweep_${cmd} PROPERTIES LABELS mpi TIMEOUT 90 PASS_REGULAR_EXPRESSION "PASS"
                       FAIL_REGULAR_EXPRESSION "FAIL")
endforeach()
foreach(case command iters help offload)
  add_test(NAME agree_mpmd_${case}
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/agree_test.sh $<TARGET_FILE:distattn> ${DA_AGREE_MPIRUN} mpmd ${case})
  set_tests_properties(agree_mpmd_${case} PROPERTIES LABELS mpi TIMEOUT 90 PASS_REGULAR_EXPRESSION "PASS"
                       FAIL_REGULAR_EXPRESSION "FAIL")
endforeach()
